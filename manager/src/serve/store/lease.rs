//! Which manager replica steps the rollouts. On PostgreSQL the one holding
//! a session advisory lock does, on a connection of its own: if that
//! replica dies, its connection closes, the lock goes with it, and another
//! replica takes it at its next tick. On SQLite there is one manager, and
//! it always leads.
//!
//! Leading is for efficiency, not safety: a step that changes a device
//! locks its row and checks it first, so even two replicas both believing
//! they lead (say across a database restart) never send a device a stage
//! twice.

use sqlx::{AnyConnection, Connection};

use super::{Backend, Store};

/// The advisory lock's key: "ferryrol" read as a number.
const ROLLOUT_LOCK: i64 = 0x6665_7272_7972_6f6c;

/// This replica's claim to step rollouts.
#[derive(Default)]
pub struct RolloutLease {
    // The connection holding the lock, apart from the pool: dropped, it
    // closes, and the lock is released.
    held: Option<AnyConnection>,
    // Leading since the last `lead`, not before it.
    taken: bool,
}

impl RolloutLease {
    /// Whether this replica leads now: keeps the lock when it has it (and
    /// its connection still answers), takes it when it is free.
    pub async fn lead(&mut self, store: &Store) -> bool {
        self.taken = false;
        if store.backend() == Backend::Sqlite {
            return true;
        }
        if let Some(connection) = &mut self.held {
            if connection.ping().await.is_ok() {
                return true;
            }
            tracing::warn!("lost the connection holding the rollout lock");
            self.held = None;
        }
        match try_lock(store).await {
            Ok(Some(connection)) => {
                tracing::info!("this replica steps the rollouts now");
                self.held = Some(connection);
                self.taken = true;
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::warn!("cannot ask for the rollout lock: {e}");
                false
            }
        }
    }

    /// Whether it holds the lock (as of the last [`Self::lead`]).
    pub fn held(&self) -> bool {
        self.held.is_some()
    }

    /// Whether the last [`Self::lead`] took the lock over: the replica
    /// that held it may have died between recording a send and making it.
    pub fn taken_over(&self) -> bool {
        self.taken
    }
}

/// A connection of its own holding the lock, or none when another has it.
/// Asked on a pooled connection, which goes back to the pool when the lock
/// is taken: a follower asks every tick, and a new database connection
/// each time would be a server process started and ended each time.
async fn try_lock(store: &Store) -> Result<Option<AnyConnection>, sqlx::Error> {
    let mut connection = store.pool.acquire().await?;
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(ROLLOUT_LOCK)
        .fetch_one(&mut *connection)
        .await?;
    Ok(locked.then(|| connection.detach()))
}
