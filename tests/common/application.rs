//! A real application (`tests/sql/rental.sql`, modelled on the pagila sample: foreign keys
//! with ON UPDATE CASCADE everywhere, BEFORE UPDATE triggers keeping `last_update`, a tsvector
//! kept by a trigger, an enum, a domain, arrays, jsonb, a partitioned table, and a reviews
//! table big enough that its copy builds its indexes after its rows) replicated under a
//! write load from before `add` until after every table is `ok`: key updates on cascading
//! parents, rows moving between partitions, a partition truncated alone, deletes cascading to
//! children. Both sides end identical, nothing stuck, nothing refused. Used by
//! `tests/application.rs` (one server) and `tests/versions.rs` (between major versions).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::replication::{
    assert_sequences_caught_up, dump_schema_into, run, wait_all_ok, wait_identical, Pair,
};
use super::KillDaemonOnDrop;

/// The application's schema and seed data.
pub const SCHEMA: &str = include_str!("../sql/rental.sql");

/// Its tables.
pub const TABLES: &[&str] = &[
    "language",
    "category",
    "actor",
    "film",
    "film_actor",
    "film_category",
    "customer",
    "inventory",
    "rental",
    "payment",
    "film_review",
];

/// One transaction of the application, picked at random; `true` when it committed.
async fn one_transaction(client: &mut tokio_postgres::Client) -> bool {
    let sql = {
        let mut rng = rand::rng();
        let (customer, inventory, film) = (
            rng.random_range(1..=600),
            rng.random_range(1..=4500),
            rng.random_range(1..=1000),
        );
        match rng.random_range(0..12) {
            // a rental and its payment
            0..=3 => format!(
                "with r as (insert into rental (rental_date, inventory_id, customer_id)
                            values (clock_timestamp(), {inventory}, {customer}) returning rental_id)
                 insert into payment (customer_id, rental_id, amount, payment_date)
                 select {customer}, rental_id, 4.99, clock_timestamp() from r"
            ),
            // a return
            4 | 5 => format!(
                "update rental set return_date = clock_timestamp()
                  where rental_id = (select max(rental_id) from rental where customer_id = {customer})"
            ),
            // a customer's key changes: cascades to their rentals and payments
            6 => format!(
                "update customer set customer_id = nextval('customer_customer_id_seq')
                  where customer_id = (select customer_id from customer order by random() limit 1)
                    and {customer} > 0"
            ),
            // a language's key changes: cascades to its films (whose triggers fire there)
            7 => "update language set language_id = nextval('language_language_id_seq')
                   where language_id = (select language_id from language order by random() limit 1)"
                .to_string(),
            // a payment moves to another year's partition
            8 => format!(
                "update payment set payment_date = payment_date + interval '1 year'
                  where payment_id = {} and payment_date < '2025-06-01'",
                rng.random_range(1..16000)
            ),
            // a film is re-described (its fulltext follows) or deleted with its children
            9 => format!(
                "update film set description = description || ' again', special_features = special_features || 'Commentaries'
                  where film_id = {film}"
            ),
            10 => format!(
                "delete from film where film_id = {film}
                    and not exists (select 1 from inventory where film_id = {film})"
            ),
            _ => format!(
                "update customer set preferences = preferences || jsonb_build_object('seen', {film}),
                                     active = not active
                  where customer_id = (select min(customer_id) from customer where customer_id >= {customer})"
            ),
        }
    };
    client.batch_execute(&sql).await.is_ok()
}

/// The same schema without rows, for a subscriber prepared before ferry is set up (the triggers
/// and keys as the application has them).
pub fn subscriber_schema() -> String {
    format!(
        "{SCHEMA}\ntruncate {} restart identity cascade;",
        TABLES.join(", ")
    )
}

/// How the subscriber got its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubscriberSchema {
    /// Dumped from the provider (`pg_dump -s`) after `provider add`, ferry's capture triggers
    /// and all, which `subscriber install` must drop.
    DumpedAfterAdd,
    /// Made before (see [`subscriber_schema`]).
    Prepared,
}

/// Replicates the application of `pair` (the provider made with [`SCHEMA`]) under load and
/// asserts both sides end identical with nothing refused.
pub async fn replicate_under_load(pair: &Pair, subscriber_schema: SubscriberSchema) {
    let (ticker, londiste) = (pair.ticker_ini(), pair.londiste_ini());
    let _stop = [
        KillDaemonOnDrop(ticker.clone()),
        KillDaemonOnDrop(londiste.clone()),
    ];
    run(&ticker, &["install"]);
    run(&ticker, &["ticker", "-d"]);
    run(&londiste, &["provider", "install"]);

    // the application writes from before `add` until after every table is ok
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for _ in 0..3 {
        let mut client = ferry_testkit::connect(&pair.provider.conninfo).await;
        let (stop, committed) = (stop.clone(), committed.clone());
        writers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if one_transaction(&mut client).await {
                    committed.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let added = run(&londiste, &["provider", "add", "--all"]);
    assert!(added.contains("public.payment: added"), "{added}");
    run(&londiste, &["provider", "add-seq", "--all"]);
    if subscriber_schema == SubscriberSchema::DumpedAfterAdd {
        // the subscriber's schema dumped from the provider now, capture triggers and all (the
        // seed's way of adding a subscriber to a running provider)
        dump_schema_into(&pair.provider.conninfo, &pair.subscriber.conninfo);
    }
    let installed = run(&londiste, &["subscriber", "install"]);
    if subscriber_schema == SubscriberSchema::DumpedAfterAdd {
        for trigger in [
            "\"ferry_insert_test-queue\" on public.film,",
            "\"ferry_rekey_test-queue\" on public.film,",
            "\"ferry_truncate_test-queue\" on public.payment,",
            "\"ferry_truncate_test-queue\" on public.payment_2024,",
            "\"ferry_truncated_test-queue\" on public.payment,",
        ] {
            assert!(
                installed.contains(trigger),
                "{trigger} not dropped: {installed}"
            );
        }
    }
    run(&londiste, &["replay", "-d"]);
    run(&londiste, &["subscriber", "add", "--all"]);
    run(&londiste, &["subscriber", "add-seq", "--all"]);
    wait_all_ok(&londiste, Duration::from_secs(180), || pair.replay_log());
    // while everything replicates: a partition truncated alone, under load
    tokio::time::sleep(Duration::from_secs(2)).await;
    ferry_testkit::connect(&pair.provider.conninfo)
        .await
        .batch_execute("truncate payment_2024")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let committed = committed.load(Ordering::Relaxed);
    assert!(
        committed > 200,
        "the application committed only {committed} transactions"
    );
    // the load did what it is for: keys moved and cascaded, films and their children went
    let provider = ferry_testkit::connect(&pair.provider.conninfo).await;
    let row = provider
        .query_one(
            "select (select count(*) from customer where customer_id > 600),
                    (select count(*) from film where film_id > 900),
                    (select count(*) from payment_2024)",
            &[],
        )
        .await
        .unwrap();
    let (moved, films_left, in_2024): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(moved > 0, "no customer key moved");
    assert!(films_left < 100, "no film deleted");
    assert!(
        in_2024 < 8000,
        "payment_2024 was truncated ({in_2024} rows since)"
    );

    wait_identical(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        TABLES,
        Duration::from_secs(120),
        || pair.replay_log(),
    )
    .await;
    assert_sequences_caught_up(
        &pair.provider.conninfo,
        &pair.subscriber.conninfo,
        &[
            "customer_customer_id_seq",
            "language_language_id_seq",
            "rental_rental_id_seq",
        ],
    )
    .await;
    let log = pair.replay_log();
    assert!(
        !log.lines().any(|l| l.contains("WARN")),
        "nothing refused, nothing stuck:\n{log}"
    );
    assert!(
        !log.contains("again in event order"),
        "no batch failed set-wise:\n{log}"
    );
    // the reviews' primary key, unique key and index were built after their rows
    assert!(
        log.lines()
            .any(|l| l.contains("indexes built after the copy")
                && l.contains("table=public.film_review")
                && l.contains("indexes=3")),
        "film_review's indexes were maintained row by row:\n{log}"
    );
}
