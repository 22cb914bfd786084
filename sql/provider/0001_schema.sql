-- ferry provider, schema version 1: which tables and sequences each queue carries.
--
-- Applied once by `ferry CONF provider install` (after the queue schema); functions live in
-- functions.sql, re-applied by every install.

-- Tables whose changes are captured into a queue. The capture triggers on the table are
-- named after the queue (see "ferry"."provider_add_table").
create table "ferry"."provider_table" (
    "queue_name"   text not null,
    "table_schema" text not null,
    "table_name"   text not null,
    "added"        timestamptz not null default now(),
    primary key ("queue_name", "table_schema", "table_name")
);

-- Sequences whose values subscribers of a queue keep up with.
create table "ferry"."provider_seq" (
    "queue_name" text not null,
    "seq_schema" text not null,
    "seq_name"   text not null,
    "added"      timestamptz not null default now(),
    primary key ("queue_name", "seq_schema", "seq_name")
);
