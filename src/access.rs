//! Who may call which routes of our HTTP listeners: networks per route
//! class. Pure: no I/O.
//!
//! Two classes. *Read* routes only look (`GET /`, `/clusters`, health
//! checks) and may stay open to a load balancer; *action* routes change
//! something (`/update_clusters`, anything added later that changes state)
//! and can be kept to trusted callers.

use std::net::IpAddr;

/// An IP network, `10.0.0.0/8` or `::1/128`; a bare address is a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    pub fn parse(s: &str) -> Result<Network, String> {
        let s = s.trim();
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or network (10.0.0.0/8, ::1)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0 to {max}"))?,
        };
        let n = Network { addr, prefix };
        if n.masked(addr) != addr {
            return Err(format!(
                "{s:?} has host bits set; the network is {}/{prefix}",
                n.masked(addr)
            ));
        }
        Ok(n)
    }

    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(v4) & mask).into())
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(v6) & mask).into())
            }
        }
    }

    /// IPv4 clients of a dual-stack socket (`::ffff:a.b.c.d`) match IPv4
    /// networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A route's class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    Read,
    Action,
}

/// The networks allowed per class; `None`: everyone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allow {
    pub read: Option<Vec<Network>>,
    pub action: Option<Vec<Network>>,
}

impl Allow {
    pub fn allows(&self, class: RouteClass, ip: IpAddr) -> bool {
        let list = match class {
            RouteClass::Read => &self.read,
            RouteClass::Action => &self.action,
        };
        list.as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(ip)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_match() {
        let n = Network::parse("10.1.0.0/16").unwrap();
        assert!(n.contains(ip("10.1.2.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(n.contains(ip("::ffff:10.1.9.9")), "v4-mapped matches");
        assert!(!n.contains(ip("::1")));
        let host = Network::parse("::1").unwrap();
        assert!(host.contains(ip("::1")) && !host.contains(ip("::2")));
        let all = Network::parse("0.0.0.0/0").unwrap();
        assert!(all.contains(ip("203.0.113.9")));
        assert!(Network::parse("::/0").unwrap().contains(ip("2001:db8::1")));
    }

    #[test]
    fn bad_networks_say_why() {
        assert_eq!(
            Network::parse("10.1.2.3/8").unwrap_err(),
            "\"10.1.2.3/8\" has host bits set; the network is 10.0.0.0/8"
        );
        assert!(Network::parse("10.0.0.0/33")
            .unwrap_err()
            .contains("0 to 32"));
        assert!(Network::parse("localhost").is_err());
    }

    #[test]
    fn classes_are_checked_apart() {
        let allow = Allow {
            read: None,
            action: Some(vec![Network::parse("127.0.0.0/8").unwrap()]),
        };
        assert!(allow.allows(RouteClass::Read, ip("192.0.2.1")));
        assert!(!allow.allows(RouteClass::Action, ip("192.0.2.1")));
        assert!(allow.allows(RouteClass::Action, ip("127.0.0.1")));
        let nobody = Allow {
            read: Some(vec![]),
            action: None,
        };
        assert!(!nobody.allows(RouteClass::Read, ip("127.0.0.1")));
    }
}
