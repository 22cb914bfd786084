-- ferry provider, schema version 4: a queue made by `ferry CONF failover` remembers where it
-- came from: the old provider's location and the last of its ticks this node had applied.
-- `ferry CONF rejoin` reads it to find, on the old provider, the transactions that never got
-- here, and removes it once the old provider has rejoined.
create table "ferry"."provider_failover" (
    "queue_name"     text primary key,
    "old_location"   text not null,
    "old_tick"       bigint not null,
    "failed_over_at" timestamptz not null default now()
);
