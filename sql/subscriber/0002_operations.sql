-- ferry subscriber, schema version 2: what operators ask of replay, per queue.
--   paused         `ferry CONF pause`: replay applies and copies nothing, keeps its position
--   last_error     the error that holds replay up now (a refused row, a missing privilege),
--   last_error_at  written by replay when it has to wait, cleared when work goes on
alter table "ferry"."subscriber_position"
    add column "paused" boolean not null default false,
    add column "last_error" text,
    add column "last_error_at" timestamptz;
