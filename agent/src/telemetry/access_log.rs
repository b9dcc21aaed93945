//! Which connections get an access-log line: on/off and a sample rate, for
//! everything or per namespace or pod (config `access_log`). Sampling is
//! deterministic: with rate r, exactly ⌊n·r⌋ of a pod's first n connections
//! are logged, so a test (or an operator) can count on it.
use std::{collections::HashMap, sync::Mutex};

use arc_swap::ArcSwap;

use crate::config::AccessLogConfig;

/// The targets of the access log's events, a line per connection and per
/// request: the modules that write them, which log nothing else (the
/// agent's log writer batches these lines).
pub const TARGETS: [&str; 2] = [
    super::connection::LOG_TARGET,
    crate::proxy::http::ACCESS_LOG_TARGET,
];

#[derive(Default)]
pub struct AccessLog {
    config: ArcSwap<AccessLogConfig>,
    /// Connections seen per pod, for sampling.
    seen: Mutex<HashMap<String, u64>>,
}

impl AccessLog {
    pub fn new(config: &AccessLogConfig) -> AccessLog {
        let log = AccessLog::default();
        log.set(config);
        log
    }

    /// Applies a new config (on reload).
    pub fn set(&self, config: &AccessLogConfig) {
        self.config.store(std::sync::Arc::new(config.clone()));
    }

    /// Whether this connection of `pod` (`namespace/name`) is logged.
    pub fn sample(&self, pod: &str) -> bool {
        let (enabled, rate) = self.rule(pod);
        if !enabled || rate <= 0.0 {
            return false;
        }
        if rate >= 1.0 {
            return true;
        }
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let count = seen.entry(pod.to_string()).or_default();
        let before = (*count as f64 * rate).floor();
        *count += 1;
        (*count as f64 * rate).floor() > before
    }

    /// (enabled, sample rate) for `pod`: its own override, else its
    /// namespace's, else the defaults.
    fn rule(&self, pod: &str) -> (bool, f64) {
        let config = self.config.load();
        let namespace = pod.split_once('/').map_or("", |(namespace, _)| namespace);
        let by_pod = config
            .overrides
            .iter()
            .find(|entry| entry.pod.as_deref() == Some(pod));
        let by_namespace = || {
            config
                .overrides
                .iter()
                .find(|entry| entry.namespace.as_deref() == Some(namespace))
        };
        match by_pod.or_else(by_namespace) {
            Some(entry) => (
                entry.enabled.unwrap_or(config.enabled),
                entry.sample_rate.unwrap_or(config.sample_rate),
            ),
            None => (config.enabled, config.sample_rate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccessLogOverride;

    fn entry(
        pod: Option<&str>,
        namespace: Option<&str>,
        enabled: Option<bool>,
        rate: Option<f64>,
    ) -> AccessLogOverride {
        AccessLogOverride {
            pod: pod.map(String::from),
            namespace: namespace.map(String::from),
            enabled,
            sample_rate: rate,
        }
    }

    #[test]
    fn pod_overrides_beat_namespace_ones_and_sampling_is_exact() {
        let log = AccessLog::new(&AccessLogConfig {
            enabled: true,
            sample_rate: 1.0,
            overrides: vec![
                entry(None, Some("quiet"), None, Some(0.25)),
                entry(Some("quiet/loud"), None, None, Some(1.0)),
                entry(None, Some("off"), Some(false), None),
            ],
        });
        let logged = (0..100).filter(|_| log.sample("quiet/a")).count();
        assert_eq!(logged, 25);
        assert!((0..10).all(|_| log.sample("quiet/loud")));
        assert!((0..10).all(|_| !log.sample("off/x")));
        assert!((0..10).all(|_| log.sample("other/x")));
    }
}
