-- ferry provider, schema version 2: SQL files run through the queue (`ferry CONF execute`).
-- One row per file run here for a queue: a file runs once per node, so running it again is
-- harmless.
create table "ferry"."provider_execute" (
    "queue_name"  text not null,
    "file_name"   text not null,
    "file_hash"   text not null,
    "executed_at" timestamptz not null default now(),
    "executed_by" text not null default current_user,
    primary key ("queue_name", "file_name")
);
