-- ferry queue: the functions. Re-applied by every `ferry CONF install`, so a newer ferry
-- replaces them in place. Every object name is schema-qualified and quoted.
--
-- Guarantees, for every consumer registered on a queue:
--   * a batch holds exactly the events of the transactions that became visible between the
--     consumer's last finished tick and the batch's tick (judged by txid snapshots);
--   * so every committed event reaches the consumer exactly once, in the first batch whose
--     tick was taken after its transaction committed; rolled-back events never do;
--   * an unfinished batch is handed out again, identical, until finish_batch is called;
--   * an event table is truncated only when every event in it has been read by every consumer.

-- Create the next tick of one queue. Ticks of a queue are serialized by a lock on its queue
-- row, so each tick's snapshot is taken after the previous tick committed.
-- A tick is durable before anyone can see it: with synchronous_commit off, a crash could
-- lose a tick a consumer had already applied, and its id would be given to a different
-- tick. So the tick's transaction commits with at least a local flush, which also makes
-- every transaction its snapshot sees durable (their commit records come before its own).
create or replace function "ferry"."tick_queue"(i_queue_id integer)
returns bigint language plpgsql as $$
declare
    v_queue   record;
    v_tick_id bigint;
begin
    if pg_catalog.current_setting('synchronous_commit') = 'off' then
        perform pg_catalog.set_config('synchronous_commit', 'local', true);
    end if;
    select "queue_name", "queue_event_seq" into v_queue
      from "ferry"."queue" where "queue_id" = i_queue_id for update;
    if not found then
        raise exception 'ferry: queue id % does not exist', i_queue_id using errcode = 'undefined_object';
    end if;
    select coalesce(max("tick_id"), 0) + 1 into v_tick_id
      from "ferry"."tick" where "tick_queue" = i_queue_id;
    insert into "ferry"."tick" ("tick_queue", "tick_id", "tick_snapshot", "tick_event_seq")
    values (i_queue_id, v_tick_id, pg_catalog.txid_current_snapshot(),
            coalesce(pg_catalog.pg_sequence_last_value(v_queue."queue_event_seq"::regclass), 0));
    -- delivered at commit: consumers listening need not poll, and one that has applied the
    -- batch ending at this tick knows it is caught up (payload TICK_ID:QUEUE_NAME)
    perform pg_catalog.pg_notify('ferry_tick', v_tick_id || ':' || v_queue."queue_name");
    return v_tick_id;
end $$;
comment on function "ferry"."tick_queue"(integer) is
    'ferry: make the next tick of a queue now; returns its tick_id';

-- Create a queue: its event sequence, its rotating event tables and its first tick.
-- Returns 1 when created, 0 when it existed already.
create or replace function "ferry"."create_queue"(i_queue_name text)
returns integer language plpgsql as $$
declare
    v_queue_id integer;
    v_ntables  integer;
    v_seq      text;
    v_parent   text;
begin
    if i_queue_name is null or i_queue_name = '' then
        raise exception 'ferry: a queue name must not be empty' using errcode = 'invalid_parameter_value';
    end if;
    perform 1 from "ferry"."queue" where "queue_name" = i_queue_name;
    if found then
        return 0;
    end if;
    insert into "ferry"."queue" ("queue_name", "queue_event_seq")
    values (i_queue_name, '')
    returning "queue_id", "queue_ntables" into v_queue_id, v_ntables;

    v_seq := pg_catalog.format('%I.%I', 'ferry', 'event_' || v_queue_id || '_seq');
    execute pg_catalog.format('create sequence %s', v_seq);
    update "ferry"."queue" set "queue_event_seq" = v_seq where "queue_id" = v_queue_id;

    v_parent := 'event_' || v_queue_id;
    execute pg_catalog.format(
        'create table %I.%I partition of %I.%I for values in (%s) partition by list (%I)',
        'ferry', v_parent, 'ferry', 'event', v_queue_id, 'ev_part');
    for v_part in 0 .. v_ntables - 1 loop
        execute pg_catalog.format('create table %I.%I partition of %I.%I for values in (%s)',
            'ferry', v_parent || '_' || v_part, 'ferry', v_parent, v_part);
    end loop;

    perform "ferry"."tick_queue"(v_queue_id);
    return 1;
end $$;
comment on function "ferry"."create_queue"(text) is
    'ferry: create a queue (1) or do nothing if it exists (0)';

-- Drop a queue with its events and ticks. Refuses while consumers are registered unless
-- i_force. Returns 1 when dropped, 0 when there was no such queue.
create or replace function "ferry"."drop_queue"(i_queue_name text, i_force boolean default false)
returns integer language plpgsql as $$
declare
    v_queue record;
    v_consumers integer;
begin
    select "queue_id", "queue_event_seq" into v_queue
      from "ferry"."queue" where "queue_name" = i_queue_name for update;
    if not found then
        return 0;
    end if;
    select count(*) into v_consumers from "ferry"."subscription" where "sub_queue" = v_queue."queue_id";
    if v_consumers > 0 and not i_force then
        raise exception 'ferry: queue "%" still has % consumer(s); unregister them first', i_queue_name, v_consumers
            using errcode = 'object_in_use';
    end if;
    execute pg_catalog.format('drop table %I.%I', 'ferry', 'event_' || v_queue."queue_id");
    delete from "ferry"."queue" where "queue_id" = v_queue."queue_id";
    execute pg_catalog.format('drop sequence %s', v_queue."queue_event_seq");
    return 1;
end $$;
comment on function "ferry"."drop_queue"(text, boolean) is
    'ferry: drop a queue and its events (1), or nothing if it does not exist (0)';

-- Insert one event into a queue, inside the caller's transaction: the event exists for
-- consumers exactly when that transaction commits. Returns the event id. Security definer
-- so that writers of replicated tables need no privileges on the queue tables.
create or replace function "ferry"."insert_event"(
    i_queue_name text, i_ev_type text, i_ev_data text,
    i_extra1 text default null, i_extra2 text default null,
    i_extra3 text default null, i_extra4 text default null)
returns bigint language plpgsql security definer set search_path = pg_catalog, pg_temp as $$
declare
    v_queue record;
    v_ev_id bigint;
begin
    select "queue_id", "queue_cur_table", "queue_event_seq" into v_queue
      from "ferry"."queue" where "queue_name" = i_queue_name;
    if not found then
        raise exception 'ferry: queue "%" does not exist', i_queue_name using errcode = 'undefined_object';
    end if;
    v_ev_id := nextval(v_queue."queue_event_seq"::regclass);
    insert into "ferry"."event" ("ev_queue", "ev_part", "ev_id", "ev_time", "ev_txid",
                                 "ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4")
    values (v_queue."queue_id", v_queue."queue_cur_table", v_ev_id, now(), txid_current(),
            i_ev_type, i_ev_data, i_extra1, i_extra2, i_extra3, i_extra4);
    return v_ev_id;
end $$;
comment on function "ferry"."insert_event"(text, text, text, text, text, text, text) is
    'ferry: insert an event in the caller''s transaction; returns its ev_id';

-- Tick one queue now, whatever its activity. Returns the new tick_id.
create or replace function "ferry"."ticker"(i_queue_name text)
returns bigint language plpgsql as $$
declare
    v_queue_id integer;
begin
    select "queue_id" into v_queue_id from "ferry"."queue" where "queue_name" = i_queue_name;
    if not found then
        raise exception 'ferry: queue "%" does not exist', i_queue_name using errcode = 'undefined_object';
    end if;
    return "ferry"."tick_queue"(v_queue_id);
end $$;
comment on function "ferry"."ticker"(text) is 'ferry: tick one queue now; returns the tick_id';

-- Whether queue i_queue_id holds an event of a transaction with an id at or past
-- i_from_txid that snapshot i_snapshot sees committed: the ticker's check for late writers.
-- Guarantee: it reads those events through the ev_txid index (few: ids that new), never a
-- whole event table. Without the setting the planner may choose to read a table whole when
-- it has no statistics yet (filled faster than autovacuum analyses it): the ticker makes
-- this check at every idle call, and kept a core busy after a load stopped.
create or replace function "ferry"."late_events_visible"(i_queue_id integer, i_from_txid bigint,
                                                         i_snapshot txid_snapshot)
returns boolean language plpgsql stable
set enable_seqscan = off
as $$
begin
    return exists (select 1 from "ferry"."event" e
                    where e."ev_queue" = i_queue_id
                      and e."ev_txid" >= i_from_txid
                      and pg_catalog.txid_visible_in_snapshot(e."ev_txid", i_snapshot));
end $$;
comment on function "ferry"."late_events_visible"(integer, bigint, txid_snapshot) is
    'ferry: the ticker''s check for late writers, always by index';

-- Tick every queue that needs it: new events since its last tick, a transaction that the
-- last tick did not see has committed since with events (it was running, or it started
-- before the tick but at or past its xmax), or the idle period has passed. A queue with
-- ticker_max_lag set lets news wait until ticker_max_count events have come or its last
-- tick is ticker_max_lag old (PgQ's thresholds: fewer, bigger batches). Returns how many
-- queues were ticked. The ticker daemon calls this every loop_delay, so events are at most
-- loop_delay (plus ticker_max_lag) late.
create or replace function "ferry"."ticker"()
returns integer language plpgsql as $$
declare
    v_queue   record;
    v_last    record;
    v_ticked  integer := 0;
    v_news    boolean;
    v_new_events bigint;
    v_now_snap txid_snapshot := pg_catalog.txid_current_snapshot();
begin
    for v_queue in
        select "queue_id", "queue_event_seq", "queue_ticker_idle_period",
               "queue_ticker_max_count", "queue_ticker_max_lag"
          from "ferry"."queue" order by "queue_id"
    loop
        select "tick_time", "tick_snapshot", "tick_event_seq" into v_last
          from "ferry"."tick" where "tick_queue" = v_queue."queue_id"
         order by "tick_id" desc limit 1;
        -- the cheap tests first (idle period, thresholds, the event sequence), each its own
        -- statement: under load the sequence says yes, and the queries with subqueries are
        -- not even planned
        v_news := not found;
        if not v_news and now() - v_last."tick_time" >= v_queue."queue_ticker_idle_period" then
            v_news := true;
        end if;
        if not v_news then
            v_new_events := coalesce(pg_catalog.pg_sequence_last_value(v_queue."queue_event_seq"::regclass), 0)
                            - v_last."tick_event_seq";
            -- below both thresholds (a max_count of 0 is none), news waits for a later check
            if (v_queue."queue_ticker_max_count" = 0 or v_new_events < v_queue."queue_ticker_max_count")
               and now() - v_last."tick_time" < v_queue."queue_ticker_max_lag" then
                continue;
            end if;
            v_news := v_new_events <> 0;
        end if;
        if not v_news then
            v_news := exists (select 1 from pg_catalog.txid_snapshot_xip(v_last."tick_snapshot") as x
                               where pg_catalog.txid_visible_in_snapshot(x, v_now_snap));
        end if;
        -- A writer whose id is at or past the last tick's xmax was not listed as running
        -- even if it had its id already (xmax is the latest completed id + 1), and it may
        -- have taken its event id before the tick read the sequence. Once something at or
        -- past that xmax has completed, look for such events (the ev_txid index; new
        -- events would have moved the sequence, so there are few to look at).
        if not v_news
           and pg_catalog.txid_snapshot_xmax(v_now_snap) > pg_catalog.txid_snapshot_xmax(v_last."tick_snapshot") then
            v_news := "ferry"."late_events_visible"(v_queue."queue_id",
                          pg_catalog.txid_snapshot_xmax(v_last."tick_snapshot"), v_now_snap);
        end if;
        if v_news then
            perform "ferry"."tick_queue"(v_queue."queue_id");
            v_ticked := v_ticked + 1;
        end if;
    end loop;
    return v_ticked;
end $$;
comment on function "ferry"."ticker"() is
    'ferry: tick every queue that has news or has idled long enough; returns the count';

-- Register a consumer on a queue. It receives the events of transactions that commit after
-- the queue's latest tick. Returns 1 when registered, 0 when it was registered already.
create or replace function "ferry"."register_consumer"(i_queue_name text, i_consumer_name text)
returns integer language plpgsql as $$
declare
    v_queue_id integer;
begin
    select "queue_id" into v_queue_id from "ferry"."queue" where "queue_name" = i_queue_name;
    if not found then
        raise exception 'ferry: queue "%" does not exist', i_queue_name using errcode = 'undefined_object';
    end if;
    if i_consumer_name is null or i_consumer_name = '' then
        raise exception 'ferry: a consumer name must not be empty' using errcode = 'invalid_parameter_value';
    end if;
    insert into "ferry"."subscription" ("sub_queue", "sub_consumer", "sub_last_tick")
    select v_queue_id, i_consumer_name, max("tick_id")
      from "ferry"."tick" where "tick_queue" = v_queue_id
    on conflict ("sub_queue", "sub_consumer") do nothing;
    return case when found then 1 else 0 end;
end $$;
comment on function "ferry"."register_consumer"(text, text) is
    'ferry: register a consumer at the latest tick (1), or nothing if registered (0)';

-- Unregister a consumer; its unfinished batch and retried events are dropped.
-- Returns 1 when unregistered, 0 when it was not registered.
create or replace function "ferry"."unregister_consumer"(i_queue_name text, i_consumer_name text)
returns integer language plpgsql as $$
begin
    delete from "ferry"."subscription" s
     using "ferry"."queue" q
     where q."queue_id" = s."sub_queue" and q."queue_name" = i_queue_name
       and s."sub_consumer" = i_consumer_name;
    return case when found then 1 else 0 end;
end $$;
comment on function "ferry"."unregister_consumer"(text, text) is
    'ferry: unregister a consumer (1), or nothing if it was not registered (0)';

-- The consumer's next batch and the two ticks that bound it. While a batch is unfinished the
-- same batch is returned again. batch_id is null when no newer tick exists yet.
-- i_max_events, when given, lets one batch span several ticks as long as they hold at most
-- that many events (by the event sequence), so a consumer far behind catches up in bigger
-- batches; a batch always spans at least one tick.
create or replace function "ferry"."next_batch_info"(
    i_queue_name text, i_consumer_name text, i_max_events bigint default null,
    out batch_id bigint,
    out prev_tick_id bigint, out prev_tick_time timestamptz, out prev_tick_event_seq bigint,
    out cur_tick_id bigint, out cur_tick_time timestamptz, out cur_tick_event_seq bigint)
returns record language plpgsql as $$
declare
    v_sub  record;
    v_next bigint;
    v_far  bigint;
begin
    -- A consumer that keeps up asks after every batch and usually finds nothing new: that
    -- answer is read without locking or writing anything (no transaction id, no WAL, no
    -- flush at commit); its last_seen moves at most once a second. Only a call that may hand
    -- out a batch locks the consumer's row and reads it again.
    select s."sub_id", s."sub_queue", s."sub_last_tick", s."sub_batch", s."sub_active",
           case when s."sub_hold_until" > now() then s."sub_hold_tick" end as hold_tick
      into v_sub
      from "ferry"."subscription" s
      join "ferry"."queue" q on q."queue_id" = s."sub_queue"
     where q."queue_name" = i_queue_name and s."sub_consumer" = i_consumer_name;
    if found and v_sub."sub_batch" is null then
        -- in tick order: without it the plan the session keeps may read the tick table from
        -- its start (it expects an early match) through every tick the consumer has passed
        perform 1 from "ferry"."tick" t
         where t."tick_queue" = v_sub."sub_queue" and t."tick_id" > v_sub."sub_last_tick"
         order by t."tick_id" limit 1;
        if not found or v_sub.hold_tick <= v_sub."sub_last_tick" then
            if v_sub."sub_active" < now() - interval '1 second' then
                update "ferry"."subscription" set "sub_active" = now() where "sub_id" = v_sub."sub_id";
            end if;
            return;
        end if;
    end if;

    select s."sub_id", s."sub_queue", s."sub_last_tick", s."sub_batch", s."sub_next_tick",
           t."tick_event_seq" as last_seq,
           case when s."sub_hold_until" > now() then s."sub_hold_tick" end as hold_tick
      into v_sub
      from "ferry"."subscription" s
      join "ferry"."queue" q on q."queue_id" = s."sub_queue"
      join "ferry"."tick" t on t."tick_queue" = s."sub_queue" and t."tick_id" = s."sub_last_tick"
     where q."queue_name" = i_queue_name and s."sub_consumer" = i_consumer_name
       for update of s;
    if not found then
        raise exception 'ferry: consumer "%" is not registered on queue "%"', i_consumer_name, i_queue_name
            using errcode = 'undefined_object';
    end if;

    if v_sub."sub_batch" is null then
        -- held at a tick (compare, repair) and there: nothing until the hold ends
        if v_sub.hold_tick <= v_sub."sub_last_tick" then
            update "ferry"."subscription" set "sub_active" = now() where "sub_id" = v_sub."sub_id";
            return;
        end if;
        select "tick_id" into v_next from "ferry"."tick"
         where "tick_queue" = v_sub."sub_queue" and "tick_id" > v_sub."sub_last_tick"
         order by "tick_id" limit 1;
        if not found then
            update "ferry"."subscription" set "sub_active" = now() where "sub_id" = v_sub."sub_id";
            return;
        end if;
        if i_max_events is not null then
            select max("tick_id") into v_far from "ferry"."tick"
             where "tick_queue" = v_sub."sub_queue" and "tick_id" > v_next
               and "tick_event_seq" - v_sub.last_seq <= i_max_events
               and "tick_id" <= coalesce(v_sub.hold_tick, "tick_id");
            v_next := coalesce(v_far, v_next);
        end if;
        update "ferry"."subscription"
           set "sub_batch" = nextval('"ferry"."batch_id_seq"'), "sub_next_tick" = v_next,
               "sub_active" = now()
         where "sub_id" = v_sub."sub_id"
        returning "sub_batch", "sub_next_tick" into v_sub."sub_batch", v_sub."sub_next_tick";
    else
        update "ferry"."subscription" set "sub_active" = now() where "sub_id" = v_sub."sub_id";
    end if;

    batch_id := v_sub."sub_batch";
    select "tick_id", "tick_time", "tick_event_seq" into prev_tick_id, prev_tick_time, prev_tick_event_seq
      from "ferry"."tick" where "tick_queue" = v_sub."sub_queue" and "tick_id" = v_sub."sub_last_tick";
    select "tick_id", "tick_time", "tick_event_seq" into cur_tick_id, cur_tick_time, cur_tick_event_seq
      from "ferry"."tick" where "tick_queue" = v_sub."sub_queue" and "tick_id" = v_sub."sub_next_tick";
end $$;
comment on function "ferry"."next_batch_info"(text, text, bigint) is
    'ferry: the consumer''s current or next batch with its bounding ticks; batch_id null if none';

-- Holds consumer i_consumer_name of queue i_queue_name at tick i_tick until i_for has passed
-- or release_consumer is called: next_batch_info hands out no batch ending past that tick.
-- Call it in the transaction that makes the tick: a batch is never cut from a tick the hold
-- does not already cover, because both become visible at the same commit. Returns false when
-- the consumer is not registered.
create or replace function "ferry"."hold_consumer"(i_queue_name text, i_consumer_name text,
    i_tick bigint, i_for interval)
returns boolean language plpgsql as $$
begin
    update "ferry"."subscription" s
       set "sub_hold_tick" = i_tick, "sub_hold_until" = now() + i_for
      from "ferry"."queue" q
     where q."queue_id" = s."sub_queue" and q."queue_name" = i_queue_name
       and s."sub_consumer" = i_consumer_name;
    return found;
end $$;
comment on function "ferry"."hold_consumer"(text, text, bigint, interval) is
    'ferry: no batch past i_tick for the consumer until released or i_for has passed';

-- Ends the hold at tick i_tick (a later hold, by another command, stays).
create or replace function "ferry"."release_consumer"(i_queue_name text, i_consumer_name text,
    i_tick bigint)
returns void language sql as $$
    update "ferry"."subscription" s
       set "sub_hold_tick" = null, "sub_hold_until" = null
      from "ferry"."queue" q
     where q."queue_id" = s."sub_queue" and q."queue_name" = i_queue_name
       and s."sub_consumer" = i_consumer_name and s."sub_hold_tick" = i_tick;
$$;
comment on function "ferry"."release_consumer"(text, text, bigint) is
    'ferry: ends the consumer''s hold at i_tick';

-- The consumer's next batch id, or null when there is none yet (see next_batch_info).
create or replace function "ferry"."next_batch"(i_queue_name text, i_consumer_name text)
returns bigint language sql as $$
    select batch_id from "ferry"."next_batch_info"(i_queue_name, i_consumer_name);
$$;
comment on function "ferry"."next_batch"(text, text) is
    'ferry: the consumer''s current or next batch id; null when none';

-- The query returning the events of a batch's transactions that became visible between two
-- of its ticks, i_from_tick and i_to_tick (sub_last_tick <= from < to <= sub_next_tick), in
-- ev_id order. Transactions whose events belong there are those not visible in the from
-- tick's snapshot and visible in the to tick's: those that started after the from tick (txid
-- >= its xmax), plus those running at it (its xip list).
-- Read part by part (see batch_parts), a batch holds the same events as read at once,
-- in an order just as faithful to the provider: when two transactions of different parts
-- touch the same row (or unique value), the one of the earlier part wrote first, because
-- the later writer waited for its commit, which the earlier tick saw.
create or replace function "ferry"."batch_event_sql"(i_batch_id bigint, i_from_tick bigint, i_to_tick bigint)
returns text language plpgsql as $$
declare
    v_batch  record;
    v_cols   text := '"ev_id", "ev_time", "ev_txid", "ev_retry", "ev_type", "ev_data", '
                     '"ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4"';
    v_where  text;
    v_xip    bigint[];
    v_sql    text;
begin
    select s."sub_id", s."sub_queue", p."tick_snapshot" as prev_snap, c."tick_snapshot" as cur_snap
      into v_batch
      from "ferry"."subscription" s
      join "ferry"."tick" p on p."tick_queue" = s."sub_queue" and p."tick_id" = i_from_tick
      join "ferry"."tick" c on c."tick_queue" = s."sub_queue" and c."tick_id" = i_to_tick
     where s."sub_batch" = i_batch_id
       and s."sub_last_tick" <= i_from_tick and i_from_tick < i_to_tick and i_to_tick <= s."sub_next_tick";
    if not found then
        if not exists (select 1 from "ferry"."subscription" where "sub_batch" = i_batch_id) then
            raise exception 'ferry: batch % is not open (finished already, or never handed out)', i_batch_id
                using errcode = 'undefined_object';
        end if;
        raise exception 'ferry: ticks % to % are not a part of batch %', i_from_tick, i_to_tick, i_batch_id
            using errcode = 'invalid_parameter_value';
    end if;

    v_where := pg_catalog.format('"ev_queue" = %s and ("ev_owner" is null or "ev_owner" = %s)',
                                 v_batch."sub_queue", v_batch."sub_id");
    v_sql := pg_catalog.format(
        'select %s from "ferry"."event" where %s and "ev_txid" >= %s and "ev_txid" < %s'
        ' and pg_catalog.txid_visible_in_snapshot("ev_txid", %L)',
        v_cols, v_where,
        pg_catalog.txid_snapshot_xmax(v_batch.prev_snap), pg_catalog.txid_snapshot_xmax(v_batch.cur_snap),
        v_batch.cur_snap);

    select array_agg(x order by x) into v_xip
      from pg_catalog.txid_snapshot_xip(v_batch.prev_snap) as x
     where pg_catalog.txid_visible_in_snapshot(x, v_batch.cur_snap);
    if v_xip is not null then
        v_sql := v_sql || pg_catalog.format(
            ' union all select %s from "ferry"."event" where %s and "ev_txid" = any (%L::bigint[])',
            v_cols, v_where, v_xip);
    end if;
    return v_sql || ' order by 1';
end $$;
comment on function "ferry"."batch_event_sql"(bigint, bigint, bigint) is
    'ferry: SQL returning the events of a part of a batch (between two of its ticks), in ev_id order';

-- The query that returns a batch's events in ev_id order. Run it as a cursor (or through
-- open_batch_cursor) to page through batches of any size.
create or replace function "ferry"."batch_event_sql"(i_batch_id bigint)
returns text language plpgsql as $$
declare
    v_sub record;
begin
    select "sub_last_tick", "sub_next_tick" into v_sub
      from "ferry"."subscription" where "sub_batch" = i_batch_id;
    if not found then
        raise exception 'ferry: batch % is not open (finished already, or never handed out)', i_batch_id
            using errcode = 'undefined_object';
    end if;
    return "ferry"."batch_event_sql"(i_batch_id, v_sub."sub_last_tick", v_sub."sub_next_tick");
end $$;
comment on function "ferry"."batch_event_sql"(bigint) is
    'ferry: SQL returning exactly the batch''s events, in ev_id order';

-- A batch cut into consecutive parts of about i_part_events events each (judged by the event
-- sequence), in order: each part runs from one of the batch's ticks to a later one, the first
-- from the batch's first tick, the last to its last. A batch of one tick is one part. Reading
-- the parts one after the other (batch_event_sql with a part's ticks) sorts a little at a
-- time, so the first events of a big batch come at once.
create or replace function "ferry"."batch_parts"(i_batch_id bigint, i_part_events bigint,
    out from_tick bigint, out to_tick bigint)
returns setof record language plpgsql as $$
declare
    v_sub      record;
    v_tick     record;
    v_from_seq bigint;
begin
    select "sub_queue", "sub_last_tick", "sub_next_tick" into v_sub
      from "ferry"."subscription" where "sub_batch" = i_batch_id;
    if not found then
        raise exception 'ferry: batch % is not open (finished already, or never handed out)', i_batch_id
            using errcode = 'undefined_object';
    end if;
    for v_tick in
        select "tick_id", "tick_event_seq" from "ferry"."tick"
         where "tick_queue" = v_sub."sub_queue"
           and "tick_id" between v_sub."sub_last_tick" and v_sub."sub_next_tick"
         order by "tick_id"
    loop
        if from_tick is null then
            if v_tick."tick_id" <> v_sub."sub_last_tick" then
                exit;
            end if;
            from_tick := v_tick."tick_id";
            v_from_seq := v_tick."tick_event_seq";
        elsif v_tick."tick_id" = v_sub."sub_next_tick"
              or v_tick."tick_event_seq" - v_from_seq >= i_part_events then
            to_tick := v_tick."tick_id";
            return next;
            from_tick := v_tick."tick_id";
            v_from_seq := v_tick."tick_event_seq";
        end if;
    end loop;
    if to_tick is distinct from v_sub."sub_next_tick" then
        raise exception 'ferry: a tick of batch % is gone (% or %)', i_batch_id,
            v_sub."sub_last_tick", v_sub."sub_next_tick" using errcode = 'data_corrupted';
    end if;
end $$;
comment on function "ferry"."batch_parts"(bigint, bigint) is
    'ferry: a batch cut into parts of about the given number of events, as pairs of its ticks';

-- All events of a batch at once (convenient for small batches; large ones: batch_event_sql
-- or open_batch_cursor).
create or replace function "ferry"."get_batch_events"(i_batch_id bigint)
returns setof "ferry"."batch_event" language plpgsql as $$
begin
    return query execute "ferry"."batch_event_sql"(i_batch_id);
end $$;
comment on function "ferry"."get_batch_events"(bigint) is
    'ferry: every event of the batch, in ev_id order';

-- At most i_limit events of a batch, the first in ev_id order: all of them when it holds no
-- more (ask for one more than you want, to know). The read stops at the limit (the sort
-- keeps only that many rows), so asking about a big batch costs a scan, not a copy of it.
-- Replay reads a small batch this way in one round trip, outside a transaction: one
-- statement sees the whole batch, whose transactions all committed before its tick.
-- Guarantee: the same events as batch_event_sql(i_batch_id), in the same order. Unlike that
-- query, built for each batch and planned at each call (a fifth of a millisecond, fifty
-- times a second), this one is static and planned once per session: a generic plan (left
-- to itself the plan cache judged every custom plan cheaper than the generic one and planned
-- at every call), reading by the ev_txid index (enable_seqscan off), so a plan made while
-- the event tables looked empty never reads a full table for a small batch.
create or replace function "ferry"."batch_events_upto"(i_batch_id bigint, i_limit bigint)
returns setof "ferry"."batch_event" language plpgsql
set enable_seqscan = off
set plan_cache_mode = force_generic_plan
as $$
declare
    v_batch record;
    v_xip   bigint[];
begin
    select s."sub_id", s."sub_queue", p."tick_snapshot" as prev_snap, c."tick_snapshot" as cur_snap
      into v_batch
      from "ferry"."subscription" s
      join "ferry"."tick" p on p."tick_queue" = s."sub_queue" and p."tick_id" = s."sub_last_tick"
      join "ferry"."tick" c on c."tick_queue" = s."sub_queue" and c."tick_id" = s."sub_next_tick"
     where s."sub_batch" = i_batch_id;
    if not found then
        raise exception 'ferry: batch % is not open (finished already, or never handed out)', i_batch_id
            using errcode = 'undefined_object';
    end if;
    -- transactions running at the earlier tick that the later one sees committed
    select array_agg(x) into v_xip
      from pg_catalog.txid_snapshot_xip(v_batch.prev_snap) as x
     where pg_catalog.txid_visible_in_snapshot(x, v_batch.cur_snap);
    return query
        select e."ev_id", e."ev_time", e."ev_txid", e."ev_retry", e."ev_type", e."ev_data",
               e."ev_extra1", e."ev_extra2", e."ev_extra3", e."ev_extra4"
          from "ferry"."event" e
         where e."ev_queue" = v_batch."sub_queue"
           and (e."ev_owner" is null or e."ev_owner" = v_batch."sub_id")
           and e."ev_txid" >= pg_catalog.txid_snapshot_xmax(v_batch.prev_snap)
           and e."ev_txid" < pg_catalog.txid_snapshot_xmax(v_batch.cur_snap)
           and pg_catalog.txid_visible_in_snapshot(e."ev_txid", v_batch.cur_snap)
        union all
        select e."ev_id", e."ev_time", e."ev_txid", e."ev_retry", e."ev_type", e."ev_data",
               e."ev_extra1", e."ev_extra2", e."ev_extra3", e."ev_extra4"
          from "ferry"."event" e
         where v_xip is not null
           and e."ev_queue" = v_batch."sub_queue"
           and (e."ev_owner" is null or e."ev_owner" = v_batch."sub_id")
           and e."ev_txid" = any (v_xip)
         order by 1
         limit i_limit;
end $$;
comment on function "ferry"."batch_events_upto"(bigint, bigint) is
    'ferry: at most i_limit events of the batch, the first in ev_id order';

-- Open a cursor named i_cursor_name over the batch's events (FETCH n FROM it, in the same
-- transaction), so a batch of millions of events never has to fit in memory.
create or replace function "ferry"."open_batch_cursor"(i_batch_id bigint, i_cursor_name text)
returns refcursor language plpgsql as $$
declare
    v_cursor refcursor := i_cursor_name;
begin
    open v_cursor no scroll for execute "ferry"."batch_event_sql"(i_batch_id);
    return v_cursor;
end $$;
comment on function "ferry"."open_batch_cursor"(bigint, text) is
    'ferry: open a named cursor over the batch''s events, in ev_id order';

-- Mark a batch finished: the consumer moves to the batch's tick. Returns 1, or 0 when the
-- batch was not open (finished already).
create or replace function "ferry"."finish_batch"(i_batch_id bigint)
returns integer language plpgsql as $$
begin
    update "ferry"."subscription"
       set "sub_last_tick" = "sub_next_tick", "sub_next_tick" = null, "sub_batch" = null,
           "sub_active" = now()
     where "sub_batch" = i_batch_id;
    return case when found then 1 else 0 end;
end $$;
comment on function "ferry"."finish_batch"(bigint) is
    'ferry: finish an open batch (1), or nothing if it is not open (0)';

-- Move a consumer on to tick i_tick_id, dropping its open batch: for a consumer whose own
-- durable record of progress (replay's position on the subscriber) is ahead of the queue's,
-- because a crash of this server lost finish_batch calls. The tick must exist and not be
-- behind the consumer's last finished tick. Returns 1 when moved, 0 when it was there.
create or replace function "ferry"."move_consumer"(i_queue_name text, i_consumer_name text, i_tick_id bigint)
returns integer language plpgsql as $$
declare
    v_sub record;
begin
    select s."sub_id", s."sub_queue", s."sub_last_tick", s."sub_batch" into v_sub
      from "ferry"."subscription" s
      join "ferry"."queue" q on q."queue_id" = s."sub_queue"
     where q."queue_name" = i_queue_name and s."sub_consumer" = i_consumer_name
       for update of s;
    if not found then
        raise exception 'ferry: consumer "%" is not registered on queue "%"', i_consumer_name, i_queue_name
            using errcode = 'undefined_object';
    end if;
    if v_sub."sub_last_tick" = i_tick_id and v_sub."sub_batch" is null then
        return 0;
    end if;
    if i_tick_id < v_sub."sub_last_tick" then
        raise exception 'ferry: consumer "%" of queue "%" is at tick %, past tick %',
            i_consumer_name, i_queue_name, v_sub."sub_last_tick", i_tick_id
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    if not exists (select 1 from "ferry"."tick"
                    where "tick_queue" = v_sub."sub_queue" and "tick_id" = i_tick_id) then
        raise exception 'ferry: queue "%" has no tick %', i_queue_name, i_tick_id
            using errcode = 'object_not_in_prerequisite_state';
    end if;
    update "ferry"."subscription"
       set "sub_last_tick" = i_tick_id, "sub_batch" = null, "sub_next_tick" = null,
           "sub_active" = now()
     where "sub_id" = v_sub."sub_id";
    return 1;
end $$;
comment on function "ferry"."move_consumer"(text, text, bigint) is
    'ferry: move a consumer on to an existing later tick, dropping its open batch (1), or nothing (0)';

-- Ask for one event of an open batch to be delivered again, to this consumer only, in a
-- batch after i_retry_seconds. Call it before finish_batch, in the same transaction.
-- Returns 1, or 0 when the event is not in the batch.
create or replace function "ferry"."event_retry"(i_batch_id bigint, i_event_id bigint, i_retry_seconds integer)
returns integer language plpgsql as $$
declare
    v_sub record;
    v_ev  "ferry"."batch_event";
begin
    select "sub_id", "sub_queue" into v_sub from "ferry"."subscription" where "sub_batch" = i_batch_id;
    if not found then
        raise exception 'ferry: batch % is not open', i_batch_id using errcode = 'undefined_object';
    end if;
    execute 'select * from (' || "ferry"."batch_event_sql"(i_batch_id) || ') as b where "ev_id" = $1'
       into v_ev using i_event_id;
    if v_ev."ev_id" is null then
        return 0;
    end if;
    insert into "ferry"."retry_queue" ("ev_retry_after", "ev_queue", "ev_owner", "ev_id", "ev_time",
        "ev_txid", "ev_retry", "ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4")
    values (now() + pg_catalog.make_interval(secs => greatest(i_retry_seconds, 0)), v_sub."sub_queue",
            v_sub."sub_id", v_ev."ev_id", v_ev."ev_time", v_ev."ev_txid", coalesce(v_ev."ev_retry", 0) + 1,
            v_ev."ev_type", v_ev."ev_data", v_ev."ev_extra1", v_ev."ev_extra2", v_ev."ev_extra3", v_ev."ev_extra4")
    on conflict ("ev_owner", "ev_id") do nothing;
    return 1;
end $$;
comment on function "ferry"."event_retry"(bigint, bigint, integer) is
    'ferry: deliver an event of an open batch again, to this consumer, after a delay';

-- Maintenance: put retried events whose time has come back into their queue, for their
-- consumer only. Returns how many.
create or replace function "ferry"."maint_retry_events"()
returns integer language plpgsql as $$
declare
    v_moved integer := 0;
    v_ev    record;
begin
    for v_ev in
        delete from "ferry"."retry_queue" where "ev_retry_after" <= now() returning *
    loop
        insert into "ferry"."event" ("ev_queue", "ev_part", "ev_id", "ev_time", "ev_txid", "ev_owner",
            "ev_retry", "ev_type", "ev_data", "ev_extra1", "ev_extra2", "ev_extra3", "ev_extra4")
        select v_ev."ev_queue", q."queue_cur_table", v_ev."ev_id", v_ev."ev_time",
               pg_catalog.txid_current(), v_ev."ev_owner", v_ev."ev_retry", v_ev."ev_type", v_ev."ev_data",
               v_ev."ev_extra1", v_ev."ev_extra2", v_ev."ev_extra3", v_ev."ev_extra4"
          from "ferry"."queue" q where q."queue_id" = v_ev."ev_queue";
        -- the event keeps its ev_id; moving the sequence tells the ticker there is news
        perform nextval(q."queue_event_seq"::regclass) from "ferry"."queue" q where q."queue_id" = v_ev."ev_queue";
        v_moved := v_moved + 1;
    end loop;
    return v_moved;
end $$;
comment on function "ferry"."maint_retry_events"() is
    'ferry: move due retried events back into their queue; returns how many';

-- Maintenance: rotate a queue's event tables when its rotation period has passed. The next
-- table is emptied with TRUNCATE and becomes current. This happens only when
--   * every consumer has passed the previous switch (rotation waits for the slowest), and
--   * under an exclusive lock on that table (so no writer is mid-insert), no event in it
--     is still unread by any consumer: the check is on the data itself, so it also holds
--     for writers that read an old queue_cur_table from an older snapshot.
-- A reader holding the table makes the rotation wait for the next run (lock_timeout 2 s).
-- Returns 1 when rotated, 0 when not (yet).
create or replace function "ferry"."maint_rotate_tables"(i_queue_name text)
returns integer language plpgsql as $$
declare
    v_queue   record;
    v_oldest  txid_snapshot;
    v_next    integer;
    v_table   text;
    v_pending boolean;
begin
    select * into v_queue from "ferry"."queue" where "queue_name" = i_queue_name for update;
    if not found then
        raise exception 'ferry: queue "%" does not exist', i_queue_name using errcode = 'undefined_object';
    end if;
    if now() - v_queue."queue_switch_time" < v_queue."queue_rotation_period" then
        return 0;
    end if;

    -- the snapshot of the oldest finished tick of any consumer
    select t."tick_snapshot" into v_oldest
      from "ferry"."subscription" s
      join "ferry"."tick" t on t."tick_queue" = s."sub_queue" and t."tick_id" = s."sub_last_tick"
     where s."sub_queue" = v_queue."queue_id"
     order by t."tick_id" limit 1;
    if v_oldest is not null and v_queue."queue_switch_txid" is not null
       and pg_catalog.txid_snapshot_xmin(v_oldest) <= v_queue."queue_switch_txid" then
        return 0;
    end if;

    v_next := (v_queue."queue_cur_table" + 1) % v_queue."queue_ntables";
    v_table := pg_catalog.format('%I.%I', 'ferry', 'event_' || v_queue."queue_id" || '_' || v_next);
    begin
        perform pg_catalog.set_config('lock_timeout', '2s', true);
        execute pg_catalog.format('lock table %s in access exclusive mode', v_table);
    exception when lock_not_available then
        return 0;
    end;
    if v_oldest is not null then
        execute pg_catalog.format(
            'select exists (select 1 from %s where "ev_txid" >= $1'
            ' and not pg_catalog.txid_visible_in_snapshot("ev_txid", $2))', v_table)
           into v_pending using pg_catalog.txid_snapshot_xmin(v_oldest), v_oldest;
        if v_pending then
            return 0;
        end if;
    end if;
    execute pg_catalog.format('truncate %s', v_table);
    update "ferry"."queue"
       set "queue_cur_table" = v_next, "queue_switch_time" = now(),
           "queue_switch_txid" = pg_catalog.txid_current()
     where "queue_id" = v_queue."queue_id";
    return 1;
end $$;
comment on function "ferry"."maint_rotate_tables"(text) is
    'ferry: rotate the queue''s event tables if due and safe (1), else 0';

-- Maintenance: delete the ticks of a queue that no consumer needs any more (those before the
-- oldest consumer position; with no consumers, all but the latest). Returns how many.
create or replace function "ferry"."maint_tick_cleanup"(i_queue_name text)
returns integer language plpgsql as $$
declare
    v_queue_id integer;
    v_keep     bigint;
    v_deleted  integer;
begin
    select "queue_id" into v_queue_id from "ferry"."queue" where "queue_name" = i_queue_name;
    if not found then
        raise exception 'ferry: queue "%" does not exist', i_queue_name using errcode = 'undefined_object';
    end if;
    select min("sub_last_tick") into v_keep from "ferry"."subscription" where "sub_queue" = v_queue_id;
    if v_keep is null then
        select max("tick_id") into v_keep from "ferry"."tick" where "tick_queue" = v_queue_id;
    end if;
    delete from "ferry"."tick" where "tick_queue" = v_queue_id and "tick_id" < v_keep;
    get diagnostics v_deleted = row_count;
    return v_deleted;
end $$;
comment on function "ferry"."maint_tick_cleanup"(text) is
    'ferry: delete ticks no consumer needs; returns how many';

-- Change a queue setting: rotation_period or ticker_idle_period (intervals).
create or replace function "ferry"."set_queue_config"(i_queue_name text, i_param text, i_value text)
returns integer language plpgsql as $$
begin
    perform 1 from "ferry"."queue" where "queue_name" = i_queue_name;
    if not found then
        raise exception 'ferry: queue "%" does not exist', i_queue_name using errcode = 'undefined_object';
    end if;
    case i_param
        when 'rotation_period' then
            update "ferry"."queue" set "queue_rotation_period" = i_value::interval where "queue_name" = i_queue_name;
        when 'ticker_idle_period' then
            update "ferry"."queue" set "queue_ticker_idle_period" = i_value::interval where "queue_name" = i_queue_name;
        when 'ticker_max_lag' then
            if i_value::interval < interval '0' then
                raise exception 'ferry: ticker_max_lag must not be negative' using errcode = 'invalid_parameter_value';
            end if;
            update "ferry"."queue" set "queue_ticker_max_lag" = i_value::interval where "queue_name" = i_queue_name;
        when 'ticker_max_count' then
            if i_value::bigint < 0 then
                raise exception 'ferry: ticker_max_count must not be negative' using errcode = 'invalid_parameter_value';
            end if;
            update "ferry"."queue" set "queue_ticker_max_count" = i_value::bigint where "queue_name" = i_queue_name;
        else
            raise exception 'ferry: unknown queue setting "%" (known: rotation_period, ticker_idle_period, ticker_max_lag, ticker_max_count)', i_param
                using errcode = 'invalid_parameter_value';
    end case;
    return 1;
end $$;
comment on function "ferry"."set_queue_config"(text, text, text) is
    'ferry: set rotation_period, ticker_idle_period, ticker_max_lag or ticker_max_count of a queue';

-- State of every queue: rotation, last tick, events not yet ticked.
create or replace function "ferry"."get_queue_info"(
    out queue_name text, out queue_ntables integer, out queue_cur_table integer,
    out queue_rotation_period interval, out queue_switch_time timestamptz,
    out queue_ticker_idle_period interval, out last_tick_id bigint, out last_tick_time timestamptz,
    out ticker_lag interval, out ev_new bigint, out consumers integer)
returns setof record language sql stable as $$
    select q."queue_name", q."queue_ntables", q."queue_cur_table", q."queue_rotation_period",
           q."queue_switch_time", q."queue_ticker_idle_period", t."tick_id", t."tick_time",
           now() - t."tick_time",
           coalesce(pg_catalog.pg_sequence_last_value(q."queue_event_seq"::regclass), 0) - t."tick_event_seq",
           (select count(*)::integer from "ferry"."subscription" s where s."sub_queue" = q."queue_id")
      from "ferry"."queue" q
      left join lateral (select "tick_id", "tick_time", "tick_event_seq" from "ferry"."tick"
                          where "tick_queue" = q."queue_id" order by "tick_id" desc limit 1) t on true
     order by q."queue_name";
$$;
comment on function "ferry"."get_queue_info"() is 'ferry: one row per queue with its state';

-- State of consumers (all, or of one queue, or one consumer): lag is the age of the last
-- tick it finished; last_seen how long since it asked for a batch; pending_events how many
-- events (by the event sequence) the queue has ticked past its position.
create or replace function "ferry"."get_consumer_info"(
    i_queue_name text default null, i_consumer_name text default null,
    out queue_name text, out consumer_name text, out lag interval, out last_seen interval,
    out last_tick bigint, out current_batch bigint, out next_tick bigint, out pending_events bigint)
returns setof record language sql stable as $$
    select q."queue_name", s."sub_consumer", now() - t."tick_time", now() - s."sub_active",
           s."sub_last_tick", s."sub_batch", s."sub_next_tick",
           greatest(l."tick_event_seq" - t."tick_event_seq", 0)
      from "ferry"."subscription" s
      join "ferry"."queue" q on q."queue_id" = s."sub_queue"
      join "ferry"."tick" t on t."tick_queue" = s."sub_queue" and t."tick_id" = s."sub_last_tick"
      left join lateral (select "tick_event_seq" from "ferry"."tick"
                          where "tick_queue" = q."queue_id" order by "tick_id" desc limit 1) l on true
     where (i_queue_name is null or q."queue_name" = i_queue_name)
       and (i_consumer_name is null or s."sub_consumer" = i_consumer_name)
     order by q."queue_name", s."sub_consumer";
$$;
comment on function "ferry"."get_consumer_info"(text, text) is 'ferry: one row per consumer with its position and lag';

-- The installed schema version of a ferry component ('queue').
create or replace function "ferry"."schema_version"(i_component text default 'queue')
returns integer language sql stable as $$
    select max("version") from "ferry"."schema_migration" where "component" = i_component;
$$;
comment on function "ferry"."schema_version"(text) is 'ferry: installed schema version of a component';

-- Whether every transaction visible in snapshot i_earlier is visible in snapshot i_later: then
-- a consumer whose position is a tick with snapshot i_later has every change committed before
-- i_earlier was taken.
create or replace function "ferry"."snapshot_covers"(i_later txid_snapshot, i_earlier txid_snapshot)
returns boolean language sql immutable set search_path = pg_catalog, pg_temp as $$
    select pg_catalog.txid_snapshot_xmax(i_earlier) <= pg_catalog.txid_snapshot_xmax(i_later)
       and not exists (select 1 from pg_catalog.txid_snapshot_xip(i_later) x
                        where x < pg_catalog.txid_snapshot_xmax(i_earlier)
                          and pg_catalog.txid_visible_in_snapshot(x, i_earlier))
$$;
comment on function "ferry"."snapshot_covers"(txid_snapshot, txid_snapshot) is
    'ferry: whether a later snapshot sees every transaction an earlier one saw';

-- Waits until at least i_consumers consumers of queue i_queue_name have finished a batch that
-- holds every transaction committed before the call (their position's tick sees all the
-- call's snapshot saw): for an application that must not answer before a replica has its
-- write. CALL it after the write's COMMIT. Replay finishes a batch on the provider only after
-- the subscriber committed it, so a finished batch is on the subscriber. Raises
-- query_canceled after i_timeout, saying how many consumers got there.
create or replace procedure "ferry"."wait_applied"(i_queue_name text, i_consumers integer default 1,
    i_timeout interval default '1 minute')
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_snapshot txid_snapshot := pg_catalog.txid_current_snapshot();
    v_deadline timestamptz := pg_catalog.clock_timestamp() + i_timeout;
    v_done integer;
begin
    if not exists (select 1 from "ferry"."queue" where "queue_name" = i_queue_name) then
        raise exception 'ferry: queue "%" does not exist', i_queue_name using errcode = 'undefined_object';
    end if;
    loop
        -- each statement reads the latest committed positions (READ COMMITTED)
        select count(*) into v_done
          from "ferry"."subscription" s
          join "ferry"."queue" q on q."queue_id" = s."sub_queue"
          join "ferry"."tick" t on t."tick_queue" = s."sub_queue" and t."tick_id" = s."sub_last_tick"
         where q."queue_name" = i_queue_name
           and "ferry"."snapshot_covers"(t."tick_snapshot", v_snapshot);
        exit when v_done >= i_consumers;
        if pg_catalog.clock_timestamp() > v_deadline then
            raise exception 'ferry: % of % consumer(s) of queue "%" applied the transactions committed before the call within %',
                            v_done, i_consumers, i_queue_name, i_timeout
                using errcode = 'query_canceled',
                      hint = 'is replay running? ("ferry CONF status" shows each consumer''s lag)';
        end if;
        perform pg_catalog.pg_sleep(0.02);
    end loop;
end $$;
comment on procedure "ferry"."wait_applied"(text, integer, interval) is
    'ferry: wait until consumers have applied everything committed before the call';

-- Every consumer of every queue, for any monitoring tool (shaped like pg_stat_replication):
-- how old its position is (lag), how long since it asked for a batch, its open batch, and
-- the events ticked past its position.
create or replace view "ferry"."stat_replication" as
select c."queue_name", c."consumer_name", c."lag", c."last_seen", c."last_tick",
       c."current_batch", c."next_tick", c."pending_events"
  from "ferry"."get_consumer_info"() c;
comment on view "ferry"."stat_replication" is
    'ferry: each consumer''s lag, last contact, open batch and pending events';
