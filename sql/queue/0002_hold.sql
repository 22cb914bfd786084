-- ferry queue schema, version 2: a consumer can be held at a tick.
--
-- `ferry CONFIG compare` and `repair` read both sides at one tick: they make the tick while
-- the compared tables are locked, and hold the subscriber's consumer there (sub_hold_tick),
-- so replay applies up to exactly that tick and no further until the hold is released or
-- sub_hold_until passes (a hold left by a killed command lapses by itself).
alter table "ferry"."subscription"
    add column "sub_hold_tick" bigint,
    add column "sub_hold_until" timestamptz;
