-- ferry subscriber, schema version 5: where the provider is, when a switchover or failover
-- moved it (replay and every command connect there instead of the config's provider_db),
-- and where the other subscribers of the queue are (copied from the provider by replay, for
-- failover when the provider is gone).
alter table "ferry"."subscriber_position" add column "provider_location" text;

create table "ferry"."subscriber_peer" (
    "queue_name" text not null,
    "consumer"   text not null,
    "location"   text not null,
    primary key ("queue_name", "consumer")
);
