-- ferry subscriber, schema version 3: SQL files run here by replay, at their place in the
-- stream (`ferry CONF execute` on the provider). A file recorded here is not run again; an
-- operator who made the same change by hand records it here so replay goes on.
create table "ferry"."subscriber_execute" (
    "queue_name"  text not null,
    "file_name"   text not null,
    "file_hash"   text not null,
    "executed_at" timestamptz not null default now(),
    primary key ("queue_name", "file_name")
);
