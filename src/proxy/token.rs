//! The token layout of the poll: one place, round-trip tested.
//!
//! Low tokens are fixed; listeners, admin, health and agent connections,
//! pre-connected backend sockets and sessions each get a range far from the
//! others. A session owns two tokens (client side and
//! backend side), `SESSION_BASE + 2 * key + side`. A token that decodes to
//! nothing is ignored, as a spurious event is.

use mio::Token;

pub const WAKER: Token = Token(0);
pub const SIGNALS: Token = Token(1);
pub const ADMIN_LISTENER: Token = Token(2);
pub const HEALTH_LISTENER: Token = Token(3);
pub const AGENT_LISTENER: Token = Token(4);

const LISTENER_BASE: usize = 16;
const ADMIN_BASE: usize = 1 << 16;
const HEALTH_BASE: usize = 1 << 17;
const AGENT_BASE: usize = 1 << 18;
const WARM_BASE: usize = 1 << 19;
const SESSION_BASE: usize = 1 << 20;

/// Most listeners, admin, health and agent connections and pre-connected
/// sockets the ranges hold.
pub const MAX_LISTENERS: usize = ADMIN_BASE - LISTENER_BASE;
pub const MAX_ADMIN_CONNS: usize = HEALTH_BASE - ADMIN_BASE;
pub const MAX_HEALTH_CONNS: usize = AGENT_BASE - HEALTH_BASE;
pub const MAX_AGENT_CONNS: usize = WARM_BASE - AGENT_BASE;
pub const MAX_WARM: usize = SESSION_BASE - WARM_BASE;

// The config refuses more ports than the listener range holds.
const _: () = assert!(crate::config::MAX_PORTS <= MAX_LISTENERS);

/// Which socket of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
}

/// What a token stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Waker,
    Signals,
    AdminListener,
    HealthListener,
    AgentListener,
    Listener(usize),
    Admin(usize),
    Health(usize),
    Agent(usize),
    /// A pre-connected backend socket (`warm.rs`).
    Warm(usize),
    Session(usize, Side),
}

pub fn listener(key: usize) -> Token {
    debug_assert!(key < MAX_LISTENERS);
    Token(LISTENER_BASE + key)
}

pub fn admin(key: usize) -> Token {
    debug_assert!(key < MAX_ADMIN_CONNS);
    Token(ADMIN_BASE + key)
}

pub fn health(key: usize) -> Token {
    debug_assert!(key < MAX_HEALTH_CONNS);
    Token(HEALTH_BASE + key)
}

pub fn agent(key: usize) -> Token {
    debug_assert!(key < MAX_AGENT_CONNS);
    Token(AGENT_BASE + key)
}

pub fn warm(key: usize) -> Token {
    debug_assert!(key < MAX_WARM);
    Token(WARM_BASE + key)
}

pub fn session(key: usize, side: Side) -> Token {
    Token(SESSION_BASE + 2 * key + usize::from(side == Side::Backend))
}

pub fn decode(token: Token) -> Option<Target> {
    let t = token.0;
    Some(match t {
        0 => Target::Waker,
        1 => Target::Signals,
        2 => Target::AdminListener,
        3 => Target::HealthListener,
        4 => Target::AgentListener,
        _ if t < LISTENER_BASE => return None,
        _ if t < ADMIN_BASE => Target::Listener(t - LISTENER_BASE),
        _ if t < HEALTH_BASE => Target::Admin(t - ADMIN_BASE),
        _ if t < AGENT_BASE => Target::Health(t - HEALTH_BASE),
        _ if t < WARM_BASE => Target::Agent(t - AGENT_BASE),
        _ if t < SESSION_BASE => Target::Warm(t - WARM_BASE),
        _ => {
            let k = t - SESSION_BASE;
            let side = if k % 2 == 0 {
                Side::Client
            } else {
                Side::Backend
            };
            Target::Session(k / 2, side)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        assert_eq!(decode(WAKER), Some(Target::Waker));
        assert_eq!(decode(SIGNALS), Some(Target::Signals));
        assert_eq!(decode(ADMIN_LISTENER), Some(Target::AdminListener));
        assert_eq!(decode(HEALTH_LISTENER), Some(Target::HealthListener));
        assert_eq!(decode(AGENT_LISTENER), Some(Target::AgentListener));
        assert_eq!(decode(Token(5)), None);
        for k in [0, 9, MAX_HEALTH_CONNS - 1] {
            assert_eq!(decode(health(k)), Some(Target::Health(k)));
        }
        for k in [0, 9, MAX_AGENT_CONNS - 1] {
            assert_eq!(decode(agent(k)), Some(Target::Agent(k)));
        }
        for k in [0, 3, MAX_WARM - 1] {
            assert_eq!(decode(warm(k)), Some(Target::Warm(k)));
        }
        for k in [0, 1, 7, MAX_LISTENERS - 1] {
            assert_eq!(decode(listener(k)), Some(Target::Listener(k)));
        }
        for k in [0, 5, MAX_ADMIN_CONNS - 1] {
            assert_eq!(decode(admin(k)), Some(Target::Admin(k)));
        }
        for k in [0, 1, 2, 1 << 30] {
            for side in [Side::Client, Side::Backend] {
                assert_eq!(decode(session(k, side)), Some(Target::Session(k, side)));
            }
        }
    }
}
