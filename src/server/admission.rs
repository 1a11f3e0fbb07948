//! Admission: who may hold a connection, as a value.
//!
//! The acceptor asks [`Admission::admit`] for a [`Permit`] before it hands a
//! connection off; the permit travels in the hand-off and then lives in the
//! connection, and dropping it gives the slot back, whichever path ends the
//! connection (closed by its worker, never registered, or lost because its worker
//! is gone). Nothing is released by hand, so no path can forget to.
//!
//! Both limits live here: `max_connections` (global) and `max_connections_per_ip`
//! (a table of open connections per client address).
//!
//! With the PROXY protocol the client's address is known only once its header has
//! arrived, so admission comes in two steps: the acceptor takes a *pending*
//! permit ([`Admission::admit_pending`], the global slot only: a connection
//! waiting for its header holds an fd), and the worker completes it with the
//! header's address ([`Permit::complete`], the per-IP slot). The accepted and
//! rejected counts of such a connection are made here, when it is decided, so
//! that a per-IP refusal is a rejection in both modes and `accepted_total`
//! counts the same connections HAProxy counts as sessions. This is control state; the
//! `sockpool_connections_active` gauge in [`Metrics`] only reports it and is moved
//! by the same two events.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::metrics::{Metrics, RejectReason};

/// The admission limits and what is admitted now. Shared (in an `Arc`) by the
/// acceptor, which takes permits, and every permit, which gives one back.
pub struct Admission {
    /// `server.max_connections`, after fitting it to RLIMIT_NOFILE.
    max_connections: usize,
    /// `server.max_connections_per_ip`; 0 = unlimited (the table stays empty).
    per_ip_limit: usize,
    /// Permits alive now.
    open: AtomicUsize,
    /// Permits alive now per client address; only kept when `per_ip_limit > 0`.
    /// An address with none is removed, so the table is as big as the set of
    /// addresses with open connections.
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
}

/// The right to hold one connection. Released when dropped.
#[must_use = "dropping a permit releases the connection's slot at once"]
pub struct Permit {
    admission: Arc<Admission>,
    /// The address counted in the per-IP table, if the table is in use.
    ip: Option<IpAddr>,
    /// Taken before the client's address was known (PROXY protocol): neither
    /// counted as accepted nor as rejected yet, and no per-IP slot.
    pending: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("ip", &self.ip)
            .field("pending", &self.pending)
            .finish()
    }
}

impl Admission {
    pub fn new(max_connections: usize, per_ip_limit: usize, metrics: Arc<Metrics>) -> Admission {
        Admission {
            max_connections,
            per_ip_limit,
            open: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// Takes a permit for a connection from `ip`, or says which limit refuses it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, RejectReason> {
        // Take a global slot first (never past the limit, whoever else admits)...
        self.take_global()?;
        // ...then the address's; giving the global one back if that refuses.
        let ip = match self.take_ip(ip) {
            Ok(ip) => ip,
            Err(reason) => {
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(reason);
            }
        };
        self.metrics.connection_admitted();
        Ok(Permit {
            admission: self.clone(),
            ip,
            pending: false,
        })
    }

    /// PROXY protocol: takes the global slot for a connection whose client is not
    /// known yet. The worker completes it ([`Permit::complete`]) once the header
    /// names the client, or settles it ([`Permit::settle`]) if none comes.
    pub fn admit_pending(self: &Arc<Self>) -> Result<Permit, RejectReason> {
        self.take_global()?;
        self.metrics.connection_admitted();
        Ok(Permit {
            admission: self.clone(),
            ip: None,
            pending: true,
        })
    }

    fn take_global(&self) -> Result<(), RejectReason> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|_| RejectReason::MaxConnections)
    }

    /// Counts `ip` in the per-IP table: the address to give back, if the table is
    /// in use.
    fn take_ip(&self, ip: IpAddr) -> Result<Option<IpAddr>, RejectReason> {
        if self.per_ip_limit == 0 {
            return Ok(None);
        }
        // One key per address: an IPv4 client of a dual-stack listener (or in an
        // IPv6 PROXY header) is `::ffff:a.b.c.d`, the same client as `a.b.c.d`.
        let ip = ip.to_canonical();
        let mut table = self.table();
        let n = table.entry(ip).or_insert(0);
        if *n >= self.per_ip_limit {
            if *n == 0 {
                table.remove(&ip);
            }
            return Err(RejectReason::PerIpLimit);
        }
        *n += 1;
        Ok(Some(ip))
    }

    /// Permits alive now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Addresses in the per-IP table (those with at least one open connection).
    pub fn addresses(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        // A panic elsewhere while holding the lock leaves a consistent table: every
        // update is a single step.
        self.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Permit {
    /// Whether this permit still waits for its client's address (PROXY protocol).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Completes a pending permit with the client's address from its PROXY
    /// header: takes the per-IP slot and counts the connection as accepted, or
    /// counts it as rejected (`per_ip_limit`); the caller then closes it (the
    /// global slot goes back when the permit is dropped). No-op on a permit that
    /// is not pending.
    pub fn complete(&mut self, ip: IpAddr) -> Result<(), RejectReason> {
        if !std::mem::take(&mut self.pending) {
            return Ok(());
        }
        let a = &self.admission;
        match a.take_ip(ip) {
            Ok(ip) => {
                self.ip = ip;
                a.metrics.accepted();
                Ok(())
            }
            Err(reason) => {
                a.metrics.rejected(reason);
                Err(reason)
            }
        }
    }

    /// A pending permit whose connection ends before its header was decided
    /// (bad or missing header, shutdown, I/O error): counted as accepted, so the
    /// close that follows keeps `accepted = sum(closed) + active`. No-op otherwise.
    pub fn settle(&mut self) {
        if std::mem::take(&mut self.pending) {
            self.admission.metrics.accepted();
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let a = &self.admission;
        if let Some(ip) = self.ip {
            let mut table = a.table();
            if let Some(n) = table.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    table.remove(&ip);
                }
            }
        }
        a.open.fetch_sub(1, Ordering::AcqRel);
        a.metrics.connection_released();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    fn active(m: &Metrics) -> String {
        let mut text = String::new();
        m.render(&mut text);
        text.lines()
            .find(|l| l.starts_with("sockpool_connections_active "))
            .unwrap_or("")
            .to_string()
    }

    #[test]
    fn global_limit_is_enforced_and_a_dropped_permit_frees_its_slot() {
        let metrics = Arc::new(Metrics::new(1, 2));
        let a = Arc::new(Admission::new(2, 0, metrics.clone()));
        let p1 = a.admit(ip(1)).unwrap();
        let p2 = a.admit(ip(2)).unwrap();
        assert_eq!(a.admit(ip(3)).unwrap_err(), RejectReason::MaxConnections);
        assert_eq!(a.open(), 2);
        assert_eq!(active(&metrics), "sockpool_connections_active 2");
        drop(p1);
        assert_eq!(a.open(), 1);
        let p3 = a.admit(ip(3)).unwrap();
        drop((p2, p3));
        assert_eq!(a.open(), 0);
        assert_eq!(active(&metrics), "sockpool_connections_active 0");
        assert_eq!(a.addresses(), 0, "no per-IP table without the limit");
    }

    #[test]
    fn per_ip_limit_counts_each_address_and_empties_its_table() {
        let metrics = Arc::new(Metrics::new(1, 100));
        let a = Arc::new(Admission::new(100, 2, metrics.clone()));
        let held: Vec<Permit> = (0..2).map(|_| a.admit(ip(1)).unwrap()).collect();
        assert_eq!(a.admit(ip(1)).unwrap_err(), RejectReason::PerIpLimit);
        // The refusal gave its global slot back.
        assert_eq!(a.open(), 2);
        let other = a.admit(ip(2)).unwrap();
        assert_eq!(a.addresses(), 2);
        drop(held);
        assert_eq!(a.addresses(), 1);
        let again = a.admit(ip(1)).unwrap();
        drop((other, again));
        assert_eq!((a.open(), a.addresses()), (0, 0));
        assert_eq!(active(&metrics), "sockpool_connections_active 0");
    }

    fn series(m: &Metrics, name: &str) -> String {
        let mut text = String::new();
        m.render(&mut text);
        text.lines()
            .find(|l| l.starts_with(name))
            .unwrap_or("")
            .to_string()
    }

    #[test]
    fn a_pending_permit_is_counted_once_when_decided() {
        let metrics = Arc::new(Metrics::new(1, 10));
        let a = Arc::new(Admission::new(10, 1, metrics.clone()));
        let accepted = || series(&metrics, "sockpool_connections_accepted_total ");
        let refused = || {
            series(
                &metrics,
                "sockpool_connections_rejected_total{reason=\"per_ip_limit\"}",
            )
        };
        // Global slot only: no address counted, nothing accepted yet.
        let mut p1 = a.admit_pending().unwrap();
        assert!(p1.pending());
        assert_eq!((a.open(), a.addresses()), (1, 0));
        assert_eq!(accepted(), "sockpool_connections_accepted_total 0");
        p1.complete(ip(1)).unwrap();
        p1.settle(); // no-op once decided
        assert_eq!(accepted(), "sockpool_connections_accepted_total 1");
        assert_eq!(a.addresses(), 1);
        // Same address over the limit: rejected, not accepted; IPv4-mapped IPv6 is
        // the same address.
        let mut p2 = a.admit_pending().unwrap();
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(p2.complete(mapped).unwrap_err(), RejectReason::PerIpLimit);
        p2.settle();
        assert_eq!(
            refused(),
            "sockpool_connections_rejected_total{reason=\"per_ip_limit\"} 1"
        );
        assert_eq!(accepted(), "sockpool_connections_accepted_total 1");
        drop(p2);
        assert_eq!((a.open(), a.addresses()), (1, 1));
        // Never decided (bad header): settled as accepted, no address.
        let mut p3 = a.admit_pending().unwrap();
        p3.settle();
        assert_eq!(accepted(), "sockpool_connections_accepted_total 2");
        drop((p1, p3));
        assert_eq!((a.open(), a.addresses()), (0, 0));
        assert_eq!(active(&metrics), "sockpool_connections_active 0");
    }

    #[test]
    fn the_global_limit_is_checked_before_the_address() {
        let metrics = Arc::new(Metrics::new(1, 1));
        let a = Arc::new(Admission::new(1, 1, metrics));
        let _p = a.admit(ip(1)).unwrap();
        assert_eq!(a.admit(ip(1)).unwrap_err(), RejectReason::MaxConnections);
        assert_eq!(a.admit(ip(2)).unwrap_err(), RejectReason::MaxConnections);
        assert_eq!(a.addresses(), 1);
    }

    #[test]
    fn permits_dropped_on_other_threads_release_exactly_once() {
        let metrics = Arc::new(Metrics::new(1, 1000));
        let a = Arc::new(Admission::new(1000, 4, metrics.clone()));
        let permits: Vec<Permit> = (0..400)
            .map(|i| a.admit(ip((i % 100) as u8)).unwrap())
            .collect();
        assert_eq!(a.open(), 400);
        let mut chunks: Vec<Vec<Permit>> = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for (i, p) in permits.into_iter().enumerate() {
            chunks[i % 4].push(p);
        }
        let threads: Vec<_> = chunks
            .into_iter()
            .map(|c| std::thread::spawn(move || drop(c)))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!((a.open(), a.addresses()), (0, 0));
        assert_eq!(active(&metrics), "sockpool_connections_active 0");
    }
}
