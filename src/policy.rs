//! Who may call what. Roles are granted to certificate identities in
//! node.toml `[roles]`; an identity not listed for a role does not have it
//! (deny by default).

use std::collections::HashSet;
use std::fmt;

use crate::config::Roles;

/// A role a caller may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// May call `Ingest`.
    Publisher,
    /// May call `Peering.Forward` (a downstream node).
    Downstream,
    /// May call `Signals.Subscribe`.
    Subscriber,
    /// May call `Insights.Query`.
    Analyst,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Publisher => "publisher",
            Role::Downstream => "downstream",
            Role::Subscriber => "subscriber",
            Role::Analyst => "analyst",
        })
    }
}

impl Role {
    /// The node.toml key that grants this role.
    pub fn config_key(self) -> &'static str {
        match self {
            Role::Publisher => "roles.publishers",
            Role::Downstream => "roles.downstream",
            Role::Subscriber => "roles.subscribers",
            Role::Analyst => "roles.analysts",
        }
    }
}

/// The role grants of one node.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    publishers: HashSet<String>,
    downstream: HashSet<String>,
    subscribers: HashSet<String>,
    analysts: HashSet<String>,
}

impl Policy {
    /// The grants of node.toml `[roles]`.
    pub fn from_roles(roles: &Roles) -> Self {
        let set = |v: &Vec<String>| v.iter().cloned().collect();
        Policy {
            publishers: set(&roles.publishers),
            downstream: set(&roles.downstream),
            subscribers: set(&roles.subscribers),
            analysts: set(&roles.analysts),
        }
    }

    /// Whether `identity` holds `role`.
    pub fn allows(&self, identity: &str, role: Role) -> bool {
        let set = match role {
            Role::Publisher => &self.publishers,
            Role::Downstream => &self.downstream,
            Role::Subscriber => &self.subscribers,
            Role::Analyst => &self.analysts,
        };
        set.contains(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_by_default() {
        let p = Policy::from_roles(&Roles {
            publishers: vec!["eshop".into()],
            ..Default::default()
        });
        assert!(p.allows("eshop", Role::Publisher));
        assert!(!p.allows("eshop", Role::Analyst));
        assert!(!p.allows("other", Role::Publisher));
    }
}
