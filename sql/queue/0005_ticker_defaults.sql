-- ferry queue schema, version 5: PgQ's thresholds on by default, at a scale of milliseconds.
--
-- The ticker now checks every 10 ms by default (loop_delay 0.01, was 0.02). A queue ticks at a
-- check when its last tick is at least ticker_max_lag old or ticker_max_count events wait:
-- with 15 ms and 64 a queue at a low or moderate rate still ticks every 20 ms (every other
-- check: its batches' fixed cost stays where it was), and one under heavy load every 10 ms,
-- where 64 events and more make a batch whose fixed cost is small beside them. Measured
-- (README, "Round five"): lag p50 19 -> 13 ms under a saturating pgbench, the same CPU per
-- transaction at 1000 tx/s. With a longer loop_delay the thresholds change nothing (every
-- check is at least 15 ms after the last tick).
--
-- Queues still at the old defaults (0 and 0: tick at the first check with news) take the new
-- ones, so an upgrade with the new loop_delay does not tick them twice as often; a queue
-- whose thresholds were set keeps them. `ferry CONFIG config QUEUE ticker_max_lag=0` brings
-- back ticking at every check that finds news.
alter table "ferry"."queue"
    alter column "queue_ticker_max_count" set default 64,
    alter column "queue_ticker_max_lag" set default '15 milliseconds';
update "ferry"."queue"
   set "queue_ticker_max_count" = 64, "queue_ticker_max_lag" = '15 milliseconds'
 where "queue_ticker_max_count" = 0 and "queue_ticker_max_lag" = '0';
