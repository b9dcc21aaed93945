//! When an edit of the config file is whole enough to apply. A file
//! replaced whole (a rename into place gives the path a new inode: Envoy's
//! file-based config and Kubernetes' ConfigMap volumes work this way, and so
//! do most editors) is taken at once. A file written in place is taken only
//! once its content has stayed the same for [`SETTLE`]: a writer that
//! pauses half way leaves a prefix that may well parse (a pod list cut
//! short), and applying it would release pods and cut their connections.
use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How long content written in place must stay unchanged to be applied.
/// Longer than a writer's pause between two writes is likely to be (the
/// half-written file seen in the field stayed 0.7 s); short enough for an
/// operator's edit to apply at once to their eyes.
pub const SETTLE: Duration = Duration::from_secs(1);

/// What the path held when it was read: the file's identity and content
/// (`Err`: why it could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reading {
    file: Option<(u64, u64)>,
    content: Result<String, String>,
}

/// Follows one config file, poll by poll.
pub struct ConfigFile {
    path: PathBuf,
    settle: Duration,
    /// What was last handed out (applied, or rejected by the parser).
    current: Reading,
    /// Different content seen since, and when it was first seen.
    candidate: Option<(Reading, Instant)>,
}

impl ConfigFile {
    /// Starts from what the file holds now (the config the agent started
    /// with).
    pub fn new(path: &Path, settle: Duration) -> ConfigFile {
        ConfigFile {
            path: path.to_path_buf(),
            settle,
            current: read(path),
            candidate: None,
        }
    }

    /// The file's new content once it is ready to be applied (`Err`: the
    /// file cannot be read, reported once per change), else `None`.
    pub fn poll(&mut self, now: Instant) -> Option<Result<String, String>> {
        let reading = read(&self.path);
        if reading.content == self.current.content {
            // Unchanged (or changed back): nothing to do. A replacement
            // with the same content becomes the file to compare with.
            self.current = reading;
            self.candidate = None;
            return None;
        }
        let replaced = reading.file.is_some() && reading.file != self.current.file;
        let settled = self
            .candidate
            .as_ref()
            .is_some_and(|(seen, since)| *seen == reading && now - *since >= self.settle);
        if replaced || settled {
            self.candidate = None;
            self.current = reading.clone();
            return Some(reading.content);
        }
        if self
            .candidate
            .as_ref()
            .is_none_or(|(seen, _)| *seen != reading)
        {
            tracing::debug!(path = %self.path.display(), "config file changed; waiting for it to settle");
            self.candidate = Some((reading, now));
        }
        None
    }
}

/// Reads the file (following a symlink, as a ConfigMap's path is one);
/// a file that changed identity while being read counts as unreadable for
/// this poll, so that the next one sees it whole.
fn read(path: &Path) -> Reading {
    let identity = |meta: std::fs::Metadata| (meta.dev(), meta.ino());
    let before = std::fs::metadata(path).map(identity).ok();
    let content = std::fs::read_to_string(path).map_err(|error| error.to_string());
    let after = std::fs::metadata(path).map(identity).ok();
    if before != after {
        return Reading {
            file: None,
            content: Err("replaced while being read".into()),
        };
    }
    Reading {
        file: after,
        content,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("weir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Dir(dir)
    }

    #[test]
    fn in_place_content_applies_only_once_it_has_settled() {
        let dir = scratch("settle");
        let path = dir.0.join("config.yaml");
        std::fs::write(&path, "a: 1\n").expect("write");
        let settle = Duration::from_secs(1);
        let mut file = ConfigFile::new(&path, settle);
        let start = Instant::now();
        assert_eq!(file.poll(start), None);
        // A first half, then the rest before it has settled.
        std::fs::write(&path, "a: 1\nb:").expect("write");
        assert_eq!(file.poll(start), None);
        assert_eq!(file.poll(start + settle / 2), None);
        std::fs::write(&path, "a: 1\nb: 2\n").expect("write");
        assert_eq!(file.poll(start + settle), None);
        assert_eq!(file.poll(start + settle + settle / 2), None);
        assert_eq!(
            file.poll(start + settle * 2),
            Some(Ok("a: 1\nb: 2\n".to_string()))
        );
        assert_eq!(file.poll(start + settle * 3), None);
    }

    #[test]
    fn a_file_renamed_into_place_applies_at_once() {
        let dir = scratch("rename");
        let path = dir.0.join("config.yaml");
        std::fs::write(&path, "a: 1\n").expect("write");
        let mut file = ConfigFile::new(&path, Duration::from_secs(1));
        let start = Instant::now();
        let next = dir.0.join("config.yaml.new");
        std::fs::write(&next, "a: 2\n").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(file.poll(start), Some(Ok("a: 2\n".to_string())));
        // The same content replaced again is no change.
        std::fs::write(&next, "a: 2\n").expect("write");
        std::fs::rename(&next, &path).expect("rename");
        assert_eq!(file.poll(start), None);
    }

    #[test]
    fn a_missing_file_is_reported_once_it_stays_missing() {
        let dir = scratch("missing");
        let path = dir.0.join("config.yaml");
        std::fs::write(&path, "a: 1\n").expect("write");
        let settle = Duration::from_secs(1);
        let mut file = ConfigFile::new(&path, settle);
        let start = Instant::now();
        std::fs::remove_file(&path).expect("remove");
        assert_eq!(file.poll(start), None);
        assert!(matches!(file.poll(start + settle), Some(Err(_))));
        assert_eq!(file.poll(start + settle * 2), None);
    }
}
