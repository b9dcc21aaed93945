//! One opener at a time per key: when several requests find no pooled
//! connection at once, the first opens one and the others wait for it and
//! then reuse it, instead of each racing to open (and handshake) its own.
//! When the opener fails, those that waited fail with it rather than each
//! trying again in turn (against a dead peer, one after the other, each
//! would wait out its own connect timeout).
use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::OwnedMutexGuard;

#[derive(Default)]
struct Turn {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Failed openings while someone waited (see [`OpenTurn::failed`]).
    failures: AtomicU64,
}

/// The turns to open, per pool key.
pub struct OpenTurns<K> {
    turns: Mutex<HashMap<K, Arc<Turn>>>,
}

impl<K> Default for OpenTurns<K> {
    fn default() -> Self {
        OpenTurns {
            turns: Mutex::new(HashMap::new()),
        }
    }
}

/// The opening this request waited for failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the connection a concurrent request was opening failed")]
pub struct OpenerFailed;

/// Held while opening; the next waiter gets its turn when this drops.
pub struct OpenTurn<'a, K: Hash + Eq> {
    turns: &'a OpenTurns<K>,
    key: K,
    turn: Arc<Turn>,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Clone> OpenTurns<K> {
    /// Waits until nobody else is opening for `key`. The caller should look
    /// in its pool again once it has the turn: the previous holder may have
    /// opened what it needs. Fails when a holder it waited for failed.
    pub async fn take(&self, key: &K) -> Result<OpenTurn<'_, K>, OpenerFailed> {
        let turn = self
            .turns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let failures = turn.failures.load(Ordering::Acquire);
        let guard = turn.lock.clone().lock_owned().await;
        let held = OpenTurn {
            turns: self,
            key: key.clone(),
            turn,
            guard: Some(guard),
        };
        if held.turn.failures.load(Ordering::Acquire) != failures {
            return Err(OpenerFailed);
        }
        Ok(held)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.turns.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<K: Hash + Eq> OpenTurn<'_, K> {
    /// Opening failed: those waiting for this turn fail too.
    pub fn failed(&self) {
        self.turn.failures.fetch_add(1, Ordering::AcqRel);
    }
}

impl<K: Hash + Eq> Drop for OpenTurn<'_, K> {
    fn drop(&mut self) {
        let mut turns = self.turns.turns.lock().unwrap_or_else(|e| e.into_inner());
        drop(self.guard.take());
        // Forget the key when nobody waits on it (only the map and this
        // turn hold it), so that keys of closed pods or rotated
        // certificates don't pile up.
        if turns
            .get(&self.key)
            .is_some_and(|turn| Arc::strong_count(turn) <= 2)
        {
            turns.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

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
                    let _turn = turns.take(&7).await.expect("nobody failed");
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

    #[tokio::test]
    async fn waiters_fail_with_a_failed_opener_and_later_requests_try_again() {
        let turns = Arc::new(OpenTurns::<u32>::default());
        let first = turns.take(&1).await.expect("first");
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let turns = turns.clone();
                tokio::spawn(async move { turns.take(&1).await.err() })
            })
            .collect();
        // Let the waiters queue up behind the opener.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        first.failed();
        drop(first);
        for waiter in waiters {
            assert_eq!(waiter.await.expect("task"), Some(OpenerFailed));
        }
        assert_eq!(turns.len(), 0);
        // A request arriving afterwards opens anew.
        assert!(turns.take(&1).await.is_ok());
    }
}
