-- ferry queue, schema version 1: the tables.
--
-- Applied once, in one transaction, by `ferry CONF install`; the applied version is recorded
-- in "ferry"."schema_migration". Functions live in functions.sql, which every install
-- re-applies, so a newer ferry upgrades them in place.
--
-- The design follows PgQ: writers insert events inside their own transaction; the ticker
-- records ticks (txid snapshots); a batch is every event of the transactions that became
-- visible between two consecutive ticks a consumer reads. Events live in a few rotating
-- tables per queue, emptied with TRUNCATE once every consumer has read them.

-- The installer creates schema "ferry" and "ferry"."schema_migration" before this file runs.
comment on schema "ferry" is 'ferry: the PgQ-style event queue (see functions.sql for the API)';

-- One row per queue.
create table "ferry"."queue" (
    "queue_id"                 serial primary key,
    "queue_name"               text not null unique,
    -- number of rotating event tables, and the one new events go to
    "queue_ntables"            integer not null default 3 check ("queue_ntables" >= 2),
    "queue_cur_table"          integer not null default 0,
    -- how often the event tables rotate, when every consumer allows it
    "queue_rotation_period"    interval not null default '2 hours',
    "queue_switch_time"        timestamptz not null default now(),
    -- txid of the transaction that made queue_cur_table current
    "queue_switch_txid"        bigint,
    -- a tick is made at least this often even when nothing happens
    "queue_ticker_idle_period" interval not null default '1 minute',
    -- the sequence that numbers this queue's events (schema-qualified name)
    "queue_event_seq"          text not null,
    "queue_created"            timestamptz not null default now()
);

-- Ticks: a txid snapshot per queue, in tick_id order; tick N+1 is always taken after tick N
-- committed. tick_event_seq is the event sequence's value at tick time (for lag and counts).
create table "ferry"."tick" (
    "tick_queue"     integer not null references "ferry"."queue" on delete cascade,
    "tick_id"        bigint not null,
    "tick_time"      timestamptz not null default now(),
    "tick_snapshot"  txid_snapshot not null,
    "tick_event_seq" bigint not null,
    primary key ("tick_queue", "tick_id")
);

-- Consumers of a queue and where they are. sub_last_tick: the last tick whose events are
-- finished. sub_batch/sub_next_tick: the batch in progress (null when none).
create table "ferry"."subscription" (
    "sub_id"        serial primary key,
    "sub_queue"     integer not null references "ferry"."queue" on delete cascade,
    "sub_consumer"  text not null,
    "sub_last_tick" bigint not null,
    "sub_batch"     bigint unique,
    "sub_next_tick" bigint,
    "sub_active"    timestamptz not null default now(),
    unique ("sub_queue", "sub_consumer")
);

create sequence "ferry"."batch_id_seq";

-- Events of all queues. Partitioned by queue, and each queue's partition by rotating table
-- number (ev_part); a rotation TRUNCATEs one leaf, never DELETEs.
-- ev_owner is null for events every consumer gets, or the sub_id of the one consumer a
-- retried event is for.
create table "ferry"."event" (
    "ev_queue"  integer not null,
    "ev_part"   smallint not null,
    "ev_id"     bigint not null,
    "ev_time"   timestamptz not null,
    "ev_txid"   bigint not null,
    "ev_owner"  integer,
    "ev_retry"  integer,
    "ev_type"   text,
    "ev_data"   text,
    "ev_extra1" text,
    "ev_extra2" text,
    "ev_extra3" text,
    "ev_extra4" text
) partition by list ("ev_queue");

create index "event_txid_idx" on "ferry"."event" ("ev_txid");

-- Events a consumer asked to see again later (event_retry); maint_retry_events puts them
-- back into the queue, for that consumer only, once ev_retry_after has passed.
create table "ferry"."retry_queue" (
    "ev_retry_after" timestamptz not null,
    "ev_queue"       integer not null references "ferry"."queue" on delete cascade,
    "ev_owner"       integer not null references "ferry"."subscription" on delete cascade,
    "ev_id"          bigint not null,
    "ev_time"        timestamptz not null,
    "ev_txid"        bigint not null,
    "ev_retry"       integer not null,
    "ev_type"        text,
    "ev_data"        text,
    "ev_extra1"      text,
    "ev_extra2"      text,
    "ev_extra3"      text,
    "ev_extra4"      text,
    primary key ("ev_owner", "ev_id")
);
create index "retry_queue_after_idx" on "ferry"."retry_queue" ("ev_retry_after");

-- The composite type batch events are returned as.
create type "ferry"."batch_event" as (
    "ev_id"     bigint,
    "ev_time"   timestamptz,
    "ev_txid"   bigint,
    "ev_retry"  integer,
    "ev_type"   text,
    "ev_data"   text,
    "ev_extra1" text,
    "ev_extra2" text,
    "ev_extra3" text,
    "ev_extra4" text
);
