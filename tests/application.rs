//! A real application's schema replicated under load (see `common/application.rs`), its
//! subscriber's schema dumped from the running provider (`pg_dump -s`, so the subscriber has the
//! same triggers and keys, and ferry's capture triggers, which `subscriber install` drops).

mod common;

use common::application::{replicate_under_load, SubscriberSchema, SCHEMA};
use common::replication::Pair;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rental_application_replicates_under_load() {
    let pair = Pair::new("rental", SCHEMA, None).await;
    replicate_under_load(&pair, SubscriberSchema::DumpedAfterAdd).await;
}
