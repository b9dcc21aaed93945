//! One opener at a time per key: when several requests find no pooled
//! connection at once, the first opens one and the others wait for it and
//! then reuse it, instead of each racing to open (and handshake) its own.
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

use tokio::sync::OwnedMutexGuard;

/// The turns to open, per pool key.
pub struct OpenTurns<K> {
    turns: Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>,
}

impl<K> Default for OpenTurns<K> {
    fn default() -> Self {
        OpenTurns {
            turns: Mutex::new(HashMap::new()),
        }
    }
}

/// Held while opening; the next waiter gets its turn when this drops.
pub struct OpenTurn<'a, K: Hash + Eq> {
    turns: &'a OpenTurns<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Clone> OpenTurns<K> {
    /// Waits until nobody else is opening for `key`. The caller should look
    /// in its pool again once it has the turn: the previous holder may have
    /// opened what it needs.
    pub async fn take(&self, key: &K) -> OpenTurn<'_, K> {
        let lock = self
            .turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let guard = lock.lock_owned().await;
        OpenTurn {
            turns: self,
            key: key.clone(),
            guard: Some(guard),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.turns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<K: Hash + Eq> Drop for OpenTurn<'_, K> {
    fn drop(&mut self) {
        let mut turns = self.turns.turns.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Forget the key when nobody waits on it (the map's own reference
        // is the only one left), so that keys of closed pods or rotated
        // certificates don't pile up.
        if turns
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            turns.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_openers_take_turns_and_the_key_is_forgotten() {
        let turns = Arc::new(OpenTurns::<u32>::default());
        let opened = Arc::new(AtomicUsize::new(0));
        let pooled = Arc::new(Mutex::new(false));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (turns, opened, pooled) = (turns.clone(), opened.clone(), pooled.clone());
                tokio::spawn(async move {
                    let _turn = turns.take(&7).await;
                    if !*pooled.lock().unwrap_or_else(|e| e.into_inner()) {
                        tokio::task::yield_now().await;
                        opened.fetch_add(1, Ordering::SeqCst);
                        *pooled.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("task");
        }
        assert_eq!(opened.load(Ordering::SeqCst), 1);
        assert_eq!(turns.len(), 0);
    }
}
