//! Exclusive turns for the round robin and random orderings.
//!
//! A turn is a lease: the holder renews it while it trains, and a holder that
//! dies stops renewing, so its lease expires and the next waiting participant
//! gets the turn. Participants that are not waiting (dead, or still busy
//! evaluating) are skipped, so no participant can stall the others for longer
//! than one lease.

use std::collections::BTreeSet;
use std::time::Duration;

use dssgd_common::config::Ordering;
use parking_lot::Mutex;
use rand::seq::IteratorRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::error::ServerError;

/// A granted turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// Token to present with the upload and to renew or release the turn.
    pub token: String,
    /// Time left on the lease.
    pub lease: Duration,
}

/// The turn coordinator of one server.
#[derive(Debug)]
pub struct Turns {
    ordering: Ordering,
    lease: Duration,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug)]
struct State {
    holder: Option<Holder>,
    /// Participants blocked in `acquire` right now.
    waiting: BTreeSet<String>,
    /// The cyclic order of round robin: participants in order of joining.
    order: Vec<String>,
    /// Position in `order` of the last participant that held the turn.
    last_position: Option<usize>,
    rng: ChaCha8Rng,
}

#[derive(Debug)]
struct Holder {
    participant: String,
    token: String,
    deadline: Instant,
}

impl Turns {
    /// Creates a coordinator for `ordering` whose leases last `lease`; `seed`
    /// drives the random ordering and the tokens.
    pub fn new(ordering: Ordering, lease: Duration, seed: u64) -> Self {
        Self {
            ordering,
            lease,
            state: Mutex::new(State {
                holder: None,
                waiting: BTreeSet::new(),
                order: Vec::new(),
                last_position: None,
                rng: ChaCha8Rng::seed_from_u64(seed),
            }),
            changed: Notify::new(),
        }
    }

    /// The ordering these turns implement.
    pub fn ordering(&self) -> Ordering {
        self.ordering
    }

    /// Adds a participant to the round robin order (no-op if present).
    pub fn register(&self, participant: &str) {
        let mut state = self.state.lock();
        if !state.order.iter().any(|p| p == participant) {
            state.order.push(participant.to_string());
        }
    }

    /// Waits up to `max_wait` for the turn. Returns `None` when the wait
    /// times out; the caller then asks again.
    pub async fn acquire(
        &self,
        participant: &str,
        max_wait: Duration,
    ) -> Result<Option<Grant>, ServerError> {
        if !self.ordering.uses_turns() {
            return Err(ServerError::TurnsDisabled);
        }
        let _waiting = WaitingGuard::enter(self, participant);
        let give_up = Instant::now() + max_wait;
        loop {
            // Registering interest before inspecting the state means a
            // release between the check and the wait still wakes this task.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            let wake_at = {
                let mut state = self.state.lock();
                let now = Instant::now();
                self.expire(&mut state, now);
                if state.holder.is_none() {
                    self.grant_next(&mut state, now);
                }
                match &state.holder {
                    Some(holder) if holder.participant == participant => {
                        return Ok(Some(Grant {
                            token: holder.token.clone(),
                            lease: holder.deadline.saturating_duration_since(now),
                        }));
                    }
                    Some(holder) => holder.deadline.min(give_up),
                    None => give_up,
                }
            };
            if Instant::now() >= give_up {
                return Ok(None);
            }
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }

    /// Extends the lease of the current holder.
    pub fn renew(&self, participant: &str, token: &str) -> Result<Grant, ServerError> {
        let mut state = self.state.lock();
        let now = Instant::now();
        self.expire(&mut state, now);
        let lease = self.lease;
        let holder = self.held_by(&mut state, participant, token)?;
        holder.deadline = now + lease;
        Ok(Grant {
            token: token.to_string(),
            lease,
        })
    }

    /// Ends the current holder's turn and wakes the waiting participants.
    pub fn release(&self, participant: &str, token: &str) -> Result<(), ServerError> {
        let mut state = self.state.lock();
        self.expire(&mut state, Instant::now());
        self.held_by(&mut state, participant, token)?;
        state.holder = None;
        drop(state);
        self.changed.notify_waiters();
        Ok(())
    }

    /// Checks that `participant` holds an unexpired turn with `token`.
    pub fn check(&self, participant: &str, token: &str) -> Result<(), ServerError> {
        let mut state = self.state.lock();
        self.expire(&mut state, Instant::now());
        self.held_by(&mut state, participant, token).map(|_| ())
    }

    fn held_by<'a>(
        &self,
        state: &'a mut State,
        participant: &str,
        token: &str,
    ) -> Result<&'a mut Holder, ServerError> {
        let no_turn = |reason: String| ServerError::NoTurn {
            participant: participant.to_string(),
            reason,
        };
        let reason = match &state.holder {
            Some(holder) if holder.participant == participant && holder.token == token => None,
            Some(holder) if holder.participant == participant => Some(
                "the token does not match the granted turn (it may be from an earlier, expired turn)",
            ),
            Some(_) => Some("another participant holds it"),
            None => Some("no turn is granted (it may have expired)"),
        };
        match (reason, state.holder.as_mut()) {
            (None, Some(holder)) => Ok(holder),
            (reason, _) => Err(no_turn(reason.unwrap_or_default().to_string())),
        }
    }

    fn expire(&self, state: &mut State, now: Instant) {
        if let Some(holder) = &state.holder
            && holder.deadline <= now
        {
            warn!(participant = %holder.participant, "turn lease expired; passing the turn on");
            state.holder = None;
            self.changed.notify_waiters();
        }
    }

    /// Grants the turn to the next waiting participant, if any.
    fn grant_next(&self, state: &mut State, now: Instant) {
        let next = match self.ordering {
            Ordering::Asynchronous => None,
            Ordering::RoundRobin => next_in_cycle(state),
            Ordering::RandomOrder => {
                let State { waiting, rng, .. } = state;
                waiting.iter().choose(rng).cloned()
            }
        };
        let Some(participant) = next else { return };
        if let Some(position) = state.order.iter().position(|p| *p == participant) {
            state.last_position = Some(position);
        }
        let token = format!("{:016x}", state.rng.random::<u64>());
        info!(participant = %participant, "turn granted");
        state.holder = Some(Holder {
            participant,
            token,
            deadline: now + self.lease,
        });
        self.changed.notify_waiters();
    }
}

/// The first waiting participant after the last holder in joining order.
fn next_in_cycle(state: &State) -> Option<String> {
    let len = state.order.len();
    let start = state.last_position.map_or(0, |p| p + 1);
    (0..len)
        .map(|offset| &state.order[(start + offset) % len])
        .find(|p| state.waiting.contains(*p))
        .cloned()
}

/// Marks a participant as waiting for as long as its `acquire` call lives,
/// including when the client disconnects and the call is dropped.
struct WaitingGuard<'a> {
    turns: &'a Turns,
    participant: String,
}

impl<'a> WaitingGuard<'a> {
    fn enter(turns: &'a Turns, participant: &str) -> Self {
        turns.state.lock().waiting.insert(participant.to_string());
        Self {
            turns,
            participant: participant.to_string(),
        }
    }
}

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.turns.state.lock().waiting.remove(&self.participant);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn lone_participant_gets_the_turn_at_once() {
        let turns = Turns::new(Ordering::RoundRobin, Duration::from_secs(10), 1);
        turns.register("a");
        let grant = turns.acquire("a", WAIT).await.unwrap().unwrap();
        assert!(turns.check("a", &grant.token).is_ok());
        assert!(turns.check("a", "wrong").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn asynchronous_ordering_has_no_turns() {
        let turns = Turns::new(Ordering::Asynchronous, Duration::from_secs(10), 1);
        assert!(matches!(
            turns.acquire("a", WAIT).await,
            Err(ServerError::TurnsDisabled)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn round_robin_cycles_in_join_order() {
        let turns = Arc::new(Turns::new(Ordering::RoundRobin, Duration::from_secs(10), 1));
        for p in ["a", "b", "c"] {
            turns.register(p);
        }
        let first = turns.acquire("a", WAIT).await.unwrap().unwrap();
        // b and c wait while a holds the turn.
        let waiters: Vec<_> = ["c", "b"]
            .into_iter()
            .map(|p| {
                let turns = turns.clone();
                tokio::spawn(async move {
                    let grant = turns.acquire(p, WAIT).await.unwrap().unwrap();
                    (p, grant)
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        turns.release("a", &first.token).unwrap();
        // b comes after a in joining order, even though c asked first.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let state_holder = turns
            .state
            .lock()
            .holder
            .as_ref()
            .map(|h| h.participant.clone());
        assert_eq!(state_holder.as_deref(), Some("b"));
        let token_b = turns.state.lock().holder.as_ref().unwrap().token.clone();
        turns.release("b", &token_b).unwrap();
        for waiter in waiters {
            let (p, grant) = waiter.await.unwrap();
            if p == "c" {
                turns.release("c", &grant.token).unwrap();
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn dead_holder_loses_the_turn_after_the_lease() {
        let lease = Duration::from_secs(3);
        let turns = Arc::new(Turns::new(Ordering::RandomOrder, lease, 1));
        turns.register("dead");
        turns.register("alive");
        let dead = turns.acquire("dead", WAIT).await.unwrap().unwrap();
        let started = Instant::now();
        let grant = turns
            .acquire("alive", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= lease && waited < lease + Duration::from_secs(1),
            "{waited:?}"
        );
        assert!(turns.check("alive", &grant.token).is_ok());
        assert!(turns.check("dead", &dead.token).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_the_turn() {
        let lease = Duration::from_secs(3);
        let turns = Turns::new(Ordering::RoundRobin, lease, 1);
        turns.register("a");
        let grant = turns.acquire("a", WAIT).await.unwrap().unwrap();
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            turns.renew("a", &grant.token).unwrap();
        }
        assert!(turns.check("a", &grant.token).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_times_out_while_another_holds() {
        let turns = Turns::new(Ordering::RoundRobin, Duration::from_secs(100), 1);
        turns.register("a");
        turns.register("b");
        let _held = turns.acquire("a", WAIT).await.unwrap().unwrap();
        assert_eq!(
            turns.acquire("b", Duration::from_secs(2)).await.unwrap(),
            None
        );
        assert!(turns.state.lock().waiting.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn random_order_gives_everyone_turns() {
        let turns = Arc::new(Turns::new(
            Ordering::RandomOrder,
            Duration::from_secs(10),
            9,
        ));
        let names = ["a", "b", "c", "d"];
        for p in names {
            turns.register(p);
        }
        let counts = Arc::new(Mutex::new(std::collections::HashMap::<&str, u32>::new()));
        let tasks: Vec<_> = names
            .into_iter()
            .map(|p| {
                let (turns, counts) = (turns.clone(), counts.clone());
                tokio::spawn(async move {
                    for _ in 0..25 {
                        let grant = turns
                            .acquire(p, Duration::from_secs(600))
                            .await
                            .unwrap()
                            .unwrap();
                        *counts.lock().entry(p).or_default() += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        turns.release(p, &grant.token).unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(counts.lock().values().sum::<u32>(), 100);
    }
}
