//! Lease-based leader election, so two operator replicas can run and only one reconciles.
//!
//! The semantics are client-go's (`k8s.io/client-go/tools/leaderelection`), made a little
//! stricter:
//! - Expiry is judged on this process's own monotonic clock, from when it last *saw the Lease
//!   change*, never by comparing the holder's `renewTime` with the local wall clock: two
//!   machines' clocks may disagree by minutes, their rates by very little.
//! - The leader stops acting `renew_deadline` after it *sent* its last successful renewal, and
//!   `renew_deadline` is shorter than the lease duration. A standby takes over no sooner than
//!   `lease_duration` after it saw that renewal, which is after it was sent; so the old leader
//!   has stopped before anyone else starts, however the API calls stall.
//! - Every API call is bounded (by the renew deadline while leading), so a hung connection
//!   cannot keep a leader acting.
//!
//! Writes are a create or a replace carrying the `resourceVersion` that was read, so two
//! candidates racing for an expired Lease cannot both win: the API server refuses the second
//! write with 409.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::time::Instant;

/// Where the Lease lives: the API server, or a fake in tests.
pub trait LeaseStore: Send + Sync {
    fn get(&self, name: &str) -> impl Future<Output = Result<Option<Lease>, kube::Error>> + Send;
    fn create(&self, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
    /// Replace, refused with 409 unless `lease.metadata.resourceVersion` is the stored one.
    fn replace(&self, name: &str, lease: &Lease) -> impl Future<Output = Result<Lease, kube::Error>> + Send;
}

impl LeaseStore for Api<Lease> {
    async fn get(&self, name: &str) -> Result<Option<Lease>, kube::Error> {
        self.get_opt(name).await
    }
    async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        Api::create(self, &PostParams::default(), lease).await
    }
    async fn replace(&self, name: &str, lease: &Lease) -> Result<Lease, kube::Error> {
        Api::replace(self, name, &PostParams::default(), lease).await
    }
}

/// Timings, as client-go names them.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a standby waits after last seeing the Lease change before taking it over.
    pub lease_duration: Duration,
    /// How long the leader keeps acting after sending its last successful renewal.
    pub renew_deadline: Duration,
    /// Pause between attempts (acquire or renew).
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        // client-go's defaults.
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "cannot take the leader Lease {namespace}/{name}: namespace {namespace} does not exist; create it (kubectl create namespace {namespace}) or pass --leader-elect=false for a local run"
    )]
    NoNamespace { namespace: String, name: String },
    #[error(
        "cannot take the leader Lease {namespace}/{name}: {message}; grant this ServiceAccount get, create and update on leases in {namespace} (the Helm chart's Role does), or pass --leader-elect=false for a local run"
    )]
    Forbidden { namespace: String, name: String, message: String },
}

/// What one attempt found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// We hold the Lease now.
    Holding,
    /// Someone else holds a Lease we have seen change within `lease_duration`.
    HeldBy(String),
}

pub struct LeaderElector<S> {
    store: S,
    namespace: String,
    name: String,
    identity: String,
    timing: Timing,
    /// The Lease spec as last seen, and when (our monotonic clock) it last changed.
    observed: Option<(LeaseSpec, Instant)>,
    /// The wall clock written into renewTime and acquireTime (informational only; never read
    /// back to decide anything). A test can skew it.
    wall: fn() -> Timestamp,
}

impl<S: LeaseStore> LeaderElector<S> {
    pub fn new(store: S, namespace: &str, name: &str, identity: &str, timing: Timing) -> Self {
        LeaderElector {
            store,
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: None,
            wall: Timestamp::now,
        }
    }

    /// The wall clock stamped into the Lease (tests skew it to show it does not matter).
    pub fn with_wall_clock(mut self, wall: fn() -> Timestamp) -> Self {
        self.wall = wall;
        self
    }

    fn spec(&self, old: &LeaseSpec, keep_acquired: bool) -> LeaseSpec {
        let now = MicroTime((self.wall)());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.timing.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: if keep_acquired { old.acquire_time.clone() } else { Some(now.clone()) },
            renew_time: Some(now),
            lease_transitions: Some(match keep_acquired {
                true => old.lease_transitions.unwrap_or(0),
                false => old.lease_transitions.unwrap_or(0).saturating_add(1),
            }),
            ..LeaseSpec::default()
        }
    }

    /// One round: read the Lease, and take or renew it unless another holder is live.
    pub async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let current = self.store.get(&self.name).await?;
        let now = Instant::now();
        let Some(mut lease) = current else {
            let fresh = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(LeaseSpec {
                    lease_transitions: Some(0),
                    ..self.spec(&LeaseSpec::default(), false)
                }),
            };
            return match self.store.create(&fresh).await {
                Ok(stored) => {
                    self.observe(stored.spec.unwrap_or_default(), now);
                    Ok(Attempt::Holding)
                }
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(Attempt::HeldBy("another candidate".into())),
                Err(e) => Err(e),
            };
        };
        let old = lease.spec.clone().unwrap_or_default();
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != old) {
            self.observe(old.clone(), now);
        }
        let holder = old.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if let Some(holder) = &holder
            && !ours
        {
            // Live until lease_duration has passed since we saw it change, on our clock.
            let duration = old
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.timing.lease_duration);
            let changed = self.observed.as_ref().map(|(_, at)| *at).unwrap_or(now);
            if now < changed + duration {
                return Ok(Attempt::HeldBy(holder.clone()));
            }
        }
        lease.spec = Some(self.spec(&old, ours));
        match self.store.replace(&self.name, &lease).await {
            Ok(stored) => {
                if let (Some(from), false) = (&holder, ours) {
                    tracing::info!(lease = %self.name, %from, "took over the leader lease from a holder that stopped renewing");
                }
                self.observe(stored.spec.unwrap_or_default(), now);
                Ok(Attempt::Holding)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                Ok(Attempt::HeldBy(holder.unwrap_or_else(|| "another candidate".into())))
            }
            Err(e) => Err(e),
        }
    }

    fn observe(&mut self, spec: LeaseSpec, at: Instant) {
        self.observed = Some((spec, at));
    }

    /// A configuration problem that retrying cannot fix, named with what to do.
    fn fatal(&self, error: &kube::Error) -> Option<LeaderError> {
        let kube::Error::Api(e) = error else { return None };
        let (namespace, name) = (self.namespace.clone(), self.name.clone());
        match e.code {
            404 if e.message.contains("namespace") => Some(LeaderError::NoNamespace { namespace, name }),
            403 => Some(LeaderError::Forbidden { namespace, name, message: e.message.clone() }),
            _ => None,
        }
    }

    /// Blocks until this replica leads; returns when it became leader, which is also when the
    /// renewal that made it so was sent (its acting deadline counts from there).
    pub async fn acquire(&mut self) -> Result<Instant, LeaderError> {
        let mut said = false;
        loop {
            let sent = Instant::now();
            let attempt = tokio::time::timeout(self.timing.renew_deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(Attempt::Holding)) => {
                    tracing::info!(lease = %self.name, identity = %self.identity, "leading");
                    return Ok(sent);
                }
                Ok(Ok(Attempt::HeldBy(holder))) => {
                    if !said {
                        tracing::info!(lease = %self.name, %holder, "another replica leads; standing by");
                        said = true;
                    }
                }
                Ok(Err(error)) => {
                    if let Some(fatal) = self.fatal(&error) {
                        return Err(fatal);
                    }
                    tracing::warn!(lease = %self.name, %error, "leader lease unavailable; retrying");
                }
                Err(_) => tracing::warn!(lease = %self.name, "reading the leader lease timed out; retrying"),
            }
            tokio::time::sleep(self.timing.retry_period).await;
        }
    }

    /// Renews every `retry_period` while leading; returns at the moment this replica must stop
    /// acting: `renew_deadline` after it sent its last successful renewal, or at once when
    /// another replica holds the Lease. A renewal still in flight then is abandoned.
    pub async fn keep(&mut self, mut last_sent: Instant) {
        loop {
            let deadline = last_sent + self.timing.renew_deadline;
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    tracing::error!(lease = %self.name, "could not renew the leader lease within the renew deadline; stopping");
                    return;
                }
                () = tokio::time::sleep(self.timing.retry_period) => {}
            }
            let sent = Instant::now();
            let attempt = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await;
            match attempt {
                Ok(Ok(Attempt::Holding)) => last_sent = sent,
                Ok(Ok(Attempt::HeldBy(holder))) => {
                    tracing::error!(lease = %self.name, %holder, "lost the leader lease to another replica");
                    return;
                }
                Ok(Err(error)) => tracing::warn!(lease = %self.name, %error, "cannot renew the leader lease"),
                Err(_) => {
                    tracing::error!(lease = %self.name, "could not renew the leader lease within the renew deadline; stopping");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// An in-memory Lease with resourceVersions, where one candidate's calls can be made to
    /// hang (a stalled connection).
    #[derive(Clone, Default)]
    struct Fake {
        lease: Arc<Mutex<Option<Lease>>>,
        stalled: Arc<Mutex<BTreeSet<String>>>,
    }

    struct Client {
        fake: Fake,
        who: String,
    }

    fn conflict() -> kube::Error {
        kube::Error::Api(kube::core::Status::failure("conflict", "Conflict").with_code(409).boxed())
    }

    impl Client {
        async fn stall_if_asked(&self) {
            if self.fake.stalled.lock().expect("lock").contains(&self.who) {
                std::future::pending::<()>().await;
            }
        }
    }

    impl LeaseStore for Client {
        async fn get(&self, _name: &str) -> Result<Option<Lease>, kube::Error> {
            self.stall_if_asked().await;
            Ok(self.fake.lease.lock().expect("lock").clone())
        }
        async fn create(&self, lease: &Lease) -> Result<Lease, kube::Error> {
            self.stall_if_asked().await;
            let mut stored = self.fake.lease.lock().expect("lock");
            if stored.is_some() {
                return Err(conflict());
            }
            let mut lease = lease.clone();
            lease.metadata.resource_version = Some("1".into());
            *stored = Some(lease.clone());
            Ok(lease)
        }
        async fn replace(&self, _name: &str, lease: &Lease) -> Result<Lease, kube::Error> {
            self.stall_if_asked().await;
            let mut stored = self.fake.lease.lock().expect("lock");
            let current = stored.as_ref().and_then(|l| l.metadata.resource_version.clone());
            if current != lease.metadata.resource_version {
                return Err(conflict());
            }
            let next: u64 = current.and_then(|v| v.parse().ok()).unwrap_or(0) + 1;
            let mut lease = lease.clone();
            lease.metadata.resource_version = Some(next.to_string());
            *stored = Some(lease.clone());
            Ok(lease)
        }
    }

    /// When each candidate acted as leader: (who, from, until).
    type Terms = Arc<Mutex<Vec<(String, Instant, Instant)>>>;

    /// A candidate as the operator runs one: acquire, act while `keep` runs, then stop (and,
    /// like the operator process, exit).
    fn candidate(
        fake: &Fake,
        who: &str,
        wall: fn() -> Timestamp,
        terms: &Terms,
    ) -> tokio::task::JoinHandle<()> {
        let client = Client { fake: fake.clone(), who: who.into() };
        let mut elector = LeaderElector::new(client, "kiln-system", "kiln-operator", who, Timing::default())
            .with_wall_clock(wall);
        let (who, terms) = (who.to_string(), terms.clone());
        tokio::spawn(async move {
            let Ok(sent) = elector.acquire().await else { return };
            let from = Instant::now();
            elector.keep(sent).await;
            terms.lock().expect("lock").push((who, from, Instant::now()));
        })
    }

    fn no_overlap(terms: &[(String, Instant, Instant)]) {
        for (i, a) in terms.iter().enumerate() {
            for b in &terms[i + 1..] {
                assert!(a.2 <= b.1 || b.2 <= a.1, "two leaders at once: {a:?} and {b:?}");
            }
        }
    }

    fn skewed_ahead() -> Timestamp {
        Timestamp::now() + k8s_openapi::jiff::SignedDuration::from_hours(1)
    }

    fn skewed_behind() -> Timestamp {
        Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(1)
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_whose_renewals_stall_stops_before_a_standby_takes_over() {
        let fake = Fake::default();
        let terms: Terms = Arc::default();
        let a = candidate(&fake, "a", Timestamp::now, &terms);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = candidate(&fake, "b", Timestamp::now, &terms);
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(terms.lock().expect("lock").is_empty(), "a keeps leading while it renews");
        // a's connection hangs: its renewals never return.
        fake.stalled.lock().expect("lock").insert("a".into());
        let stalled_at = Instant::now();
        a.await.expect("a stops");
        tokio::time::sleep(Duration::from_secs(60)).await;
        fake.stalled.lock().expect("lock").insert("b".into());
        b.await.expect("b stops once stalled too");
        let terms = terms.lock().expect("lock").clone();
        assert_eq!(terms.len(), 2, "{terms:?}");
        let (a_term, b_term) = (&terms[0], &terms[1]);
        assert_eq!((a_term.0.as_str(), b_term.0.as_str()), ("a", "b"));
        assert!(
            a_term.2 <= stalled_at + Timing::default().renew_deadline,
            "a stopped within its renew deadline"
        );
        no_overlap(&terms);
    }

    #[tokio::test(start_paused = true)]
    async fn skewed_wall_clocks_never_make_two_leaders() {
        // Each side of the skew: the old code, comparing renewTime with the local clock, let a
        // candidate whose clock runs an hour ahead take over a live lease at once.
        for (leader_clock, standby_clock) in [
            (skewed_behind as fn() -> Timestamp, skewed_ahead as fn() -> Timestamp),
            (skewed_ahead, skewed_behind),
        ] {
            let fake = Fake::default();
            let terms: Terms = Arc::default();
            let a = candidate(&fake, "a", leader_clock, &terms);
            tokio::time::sleep(Duration::from_secs(1)).await;
            let b = candidate(&fake, "b", standby_clock, &terms);
            tokio::time::sleep(Duration::from_secs(120)).await;
            assert!(terms.lock().expect("lock").is_empty(), "nobody lost or stole the lease while a renews");
            let holder =
                fake.lease.lock().expect("lock").as_ref().and_then(|l| l.spec.clone()?.holder_identity);
            assert_eq!(holder.as_deref(), Some("a"));
            // a dies without a word: b takes over once the lease, as b saw it, has expired.
            a.abort();
            let died = Instant::now();
            let _ = a.await;
            terms.lock().expect("lock").push(("a".into(), Instant::now() - Duration::from_secs(121), died));
            let took_over = loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let holder =
                    fake.lease.lock().expect("lock").as_ref().and_then(|l| l.spec.clone()?.holder_identity);
                if holder.as_deref() == Some("b") {
                    break Instant::now();
                }
                assert!(Instant::now() < died + Duration::from_secs(60), "b never took over");
            };
            assert!(took_over >= died + Duration::from_secs(13), "b waited out the lease on its own clock");
            fake.stalled.lock().expect("lock").insert("b".into());
            b.await.expect("b stops");
            no_overlap(&terms.lock().expect("lock"));
        }
    }

    #[test]
    fn a_missing_namespace_or_rbac_is_said_with_what_to_do() {
        let elector = LeaderElector::new(
            Client { fake: Fake::default(), who: "a".into() },
            "kiln-system",
            "kiln-operator",
            "a",
            Timing::default(),
        );
        let not_found = kube::Error::Api(
            kube::core::Status::failure("namespaces \"kiln-system\" not found", "NotFound")
                .with_code(404)
                .boxed(),
        );
        let msg = elector.fatal(&not_found).expect("fatal").to_string();
        assert!(
            msg.contains("create namespace kiln-system") && msg.contains("--leader-elect=false"),
            "{msg}"
        );
        let forbidden = kube::Error::Api(
            kube::core::Status::failure("leases is forbidden", "Forbidden").with_code(403).boxed(),
        );
        assert!(elector.fatal(&forbidden).expect("fatal").to_string().contains("leases in kiln-system"));
        let transient = kube::Error::Api(
            kube::core::Status::failure("etcd timeout", "InternalError").with_code(500).boxed(),
        );
        assert!(elector.fatal(&transient).is_none(), "a transient error is retried");
    }
}
