//! Lease-based leader election, so two operator replicas can run and only one reconciles.
//!
//! The decision is a pure function of the Lease as read (unit-tested); the I/O is a get and a
//! create or replace guarded by `resourceVersion`, so two candidates racing for an expired Lease
//! cannot both win: the API server refuses the second write with 409.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};

/// What a candidate should do with the Lease it read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it: create (or take) it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// The holder stopped renewing: take it over, counting a transition.
    TakeOver { from: String },
    /// Someone else holds a live lease.
    Wait { holder: String },
}

pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp, default_duration: Duration) -> Decision {
    let Some(spec) = spec else { return Decision::Acquire };
    let Some(holder) = spec.holder_identity.clone().filter(|h| !h.is_empty()) else {
        return Decision::Acquire;
    };
    if holder == me {
        return Decision::Renew;
    }
    let duration = spec
        .lease_duration_seconds
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
        .unwrap_or(default_duration);
    let expired = match &spec.renew_time {
        Some(MicroTime(renewed)) => {
            let age = now.duration_since(*renewed);
            age.as_secs_f64() > duration.as_secs_f64()
        }
        None => true,
    };
    if expired { Decision::TakeOver { from: holder } } else { Decision::Wait { holder } }
}

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, name: &str, identity: &str, duration: Duration) -> Self {
        LeaderElector { api, name: name.into(), identity: identity.into(), duration }
    }

    /// One round: true when we hold the Lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let current = self.api.get_opt(&self.name).await?;
        let decision =
            decide(current.as_ref().and_then(|l| l.spec.as_ref()), &self.identity, now, self.duration);
        let old = current.as_ref().and_then(|l| l.spec.clone()).unwrap_or_default();
        let spec = |transitions: Option<i32>, acquired: Option<MicroTime>| LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX)),
            acquire_time: acquired.or(Some(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: transitions,
            ..LeaseSpec::default()
        };
        let result = match (&decision, current) {
            (Decision::Wait { .. }, _) => return Ok(false),
            (_, None) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                    spec: Some(spec(Some(0), None)),
                };
                self.api.create(&PostParams::default(), &lease).await.map(|_| ())
            }
            (d, Some(mut lease)) => {
                lease.spec = Some(match d {
                    Decision::Renew => spec(old.lease_transitions, old.acquire_time.clone()),
                    _ => spec(Some(old.lease_transitions.unwrap_or(0) + 1), None),
                });
                // `replace` carries the resourceVersion we read: a concurrent winner makes it 409.
                self.api.replace(&self.name, &PostParams::default(), &lease).await.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                if let Decision::TakeOver { from } = &decision {
                    tracing::info!(lease = %self.name, %from, "took over the leader lease from a holder that stopped renewing");
                }
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Blocks until this replica leads; logs who does meanwhile.
    pub async fn acquire(&self, retry: Duration) {
        let mut said = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                    return;
                }
                Ok(false) => {
                    if !said {
                        tracing::info!(lease = %self.name, "another replica leads; standing by");
                        said = true;
                    }
                }
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "leader lease unavailable; retrying")
                }
            }
            tokio::time::sleep(retry).await;
        }
    }

    /// Renews every `period` until a renewal has failed for longer than the lease lasts, then
    /// returns: the caller must stop reconciling (another replica may lead by then).
    pub async fn keep(&self, period: Duration) {
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.name, "lost the leader lease to another replica");
                    return;
                }
                Err(error) => {
                    tracing::warn!(lease = %self.name, %error, "cannot renew the leader lease");
                    if last_ok.elapsed() > self.duration {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed_secs_ago: i64, duration: i32) -> LeaseSpec {
        let now = Timestamp::now();
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(duration),
            renew_time: Some(MicroTime(now - jiff_secs(renewed_secs_ago))),
            ..LeaseSpec::default()
        }
    }

    fn jiff_secs(s: i64) -> k8s_openapi::jiff::SignedDuration {
        k8s_openapi::jiff::SignedDuration::from_secs(s)
    }

    const D: Duration = Duration::from_secs(15);

    #[test]
    fn no_lease_or_no_holder_is_acquired() {
        assert_eq!(decide(None, "a", Timestamp::now(), D), Decision::Acquire);
        let empty = LeaseSpec { holder_identity: Some(String::new()), ..LeaseSpec::default() };
        assert_eq!(decide(Some(&empty), "a", Timestamp::now(), D), Decision::Acquire);
    }

    #[test]
    fn the_holder_renews_and_others_wait_until_it_expires() {
        let fresh = lease("a", 3, 15);
        assert_eq!(decide(Some(&fresh), "a", Timestamp::now(), D), Decision::Renew);
        assert_eq!(decide(Some(&fresh), "b", Timestamp::now(), D), Decision::Wait { holder: "a".into() });
        let stale = lease("a", 20, 15);
        assert_eq!(decide(Some(&stale), "b", Timestamp::now(), D), Decision::TakeOver { from: "a".into() });
        // The holder's own stale lease is simply renewed.
        assert_eq!(decide(Some(&stale), "a", Timestamp::now(), D), Decision::Renew);
    }

    #[test]
    fn a_lease_never_renewed_is_expired() {
        let never = LeaseSpec { holder_identity: Some("a".into()), ..LeaseSpec::default() };
        assert_eq!(decide(Some(&never), "b", Timestamp::now(), D), Decision::TakeOver { from: "a".into() });
    }
}
