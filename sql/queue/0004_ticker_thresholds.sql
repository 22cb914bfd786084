-- ferry queue schema, version 4: PgQ's ticker thresholds, so a queue may tick less often
-- than every check of the ticker.
--
-- The ticker checks every queue every loop_delay (20 ms by default) and, as before, ticks a
-- queue with news at the first check that finds it: each tick makes a batch for every
-- consumer, and at a low rate of writes those batches' fixed cost is most of what
-- replication costs. With queue_ticker_max_lag set, news waits until either
-- queue_ticker_max_count events have come since the last tick or the last tick is
-- queue_ticker_max_lag old (PgQ's ticker_max_count and ticker_max_lag; a max_count of 0 is
-- no count threshold; a max_lag of 0, the default, keeps ticking at the first check): fewer,
-- bigger batches, for a lag of up to max_lag. The idle period still ticks a queue with no
-- news at all.
alter table "ferry"."queue"
    add column "queue_ticker_max_count" bigint not null default 0
        check ("queue_ticker_max_count" >= 0),
    add column "queue_ticker_max_lag" interval not null default '0'
        check ("queue_ticker_max_lag" >= interval '0');
