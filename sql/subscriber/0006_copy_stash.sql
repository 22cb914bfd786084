-- ferry subscriber, schema version 6: copies run beside the batch stream.
--
-- A copy records the provider snapshot it reads under (copy_snapshot of a table still
-- in-copy) before its rows are read, while it holds the position's row lock, so no batch
-- is being applied at that moment. Every batch applied after that keeps the table's events
-- that the copy cannot contain (transactions its snapshot does not see) here, in the batch's
-- own transaction; the first batch to find the table copied applies them, in the order they
-- came, before its own events, and deletes them. So the copy of one table can take an hour
-- while every other table keeps replicating, and no event of the copied table is lost or
-- applied twice.
create table "ferry"."subscriber_stash" (
    "queue_name"   text not null,
    -- the tick of the batch that kept the event, then its place in that batch: the order
    -- events are applied in
    "stash_tick"   bigint not null,
    "stash_pos"    integer not null,
    "table_schema" text not null,
    "table_name"   text not null,
    -- the queue event as the provider's queue holds it
    "ev_id"        bigint not null,
    "ev_time"      timestamptz not null,
    "ev_txid"      bigint not null,
    "ev_type"      text,
    "ev_data"      text,
    "ev_extra1"    text,
    "ev_extra2"    text,
    "ev_extra3"    text,
    "ev_extra4"    text,
    primary key ("queue_name", "stash_tick", "stash_pos")
);
