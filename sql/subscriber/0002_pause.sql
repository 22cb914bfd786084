-- ferry subscriber, schema version 2: replay can be paused per queue (`ferry CONF pause`):
-- it applies nothing and copies nothing while paused, and keeps its position.
alter table "ferry"."subscriber_position"
    add column "paused" boolean not null default false;
