-- ferry subscriber, schema version 1: where replay is, and the state of each replicated table.
--
-- Applied once by `ferry CONF subscriber install`; functions live in functions.sql.

-- The last tick whose batch is applied here, per queue. Replay updates it in the same
-- transaction as the batch's changes: a batch whose tick is recorded is never applied again.
create table "ferry"."subscriber_position" (
    "queue_name"   text primary key,
    "consumer"     text not null,
    "last_tick_id" bigint,
    "updated"      timestamptz not null default now()
);

-- Replicated tables and their state:
--   in-copy      waiting for or in its initial copy (replay ignores its events meanwhile)
--   catching-up  copied under copy_snapshot; events of transactions visible in it are skipped
--   ok           every event is applied
create table "ferry"."subscriber_table" (
    "queue_name"    text not null,
    "table_schema"  text not null,
    "table_name"    text not null,
    "state"         text not null default 'in-copy'
                    check ("state" in ('in-copy', 'catching-up', 'ok')),
    "copy_snapshot" text,
    "copied_rows"   bigint,
    -- keep the rows already there when copying (subscriber add --skip-truncate)
    "skip_truncate" boolean not null default false,
    "added"         timestamptz not null default now(),
    "state_changed" timestamptz not null default now(),
    primary key ("queue_name", "table_schema", "table_name")
);

-- Sequences kept at or above the provider's values.
create table "ferry"."subscriber_seq" (
    "queue_name" text not null,
    "seq_schema" text not null,
    "seq_name"   text not null,
    "added"      timestamptz not null default now(),
    primary key ("queue_name", "seq_schema", "seq_name")
);
