-- ferry provider, schema version 3: where each consumer's subscriber database is. Written by
-- `subscriber install` and by replay at every start; read by switchover and failover, which
-- must reach every subscriber (and copied to each subscriber, which failover reads when this
-- database is gone). The location is a connection string without its password (give it
-- through .pgpass or a service file where these commands run).
create table "ferry"."provider_subscriber" (
    "queue_name" text not null,
    "consumer"   text not null,
    "location"   text not null,
    "updated"    timestamptz not null default now(),
    primary key ("queue_name", "consumer")
);
