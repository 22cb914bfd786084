-- ferry subscriber functions. Re-applied by every `ferry CONF subscriber install`.

-- Statement trigger on every replicated subscriber table: refuses writes from anyone but
-- replay (which sets "ferry.replay" to 'on' in its transactions). It guards against mistakes,
-- not against a session that sets the flag on purpose.
create or replace function "ferry"."protect_replica"() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    if coalesce(current_setting('ferry.replay', true), '') <> 'on' then
        raise exception 'ferry: %.% is a replica of queue "%": only ferry replay may change it',
                        quote_ident(TG_TABLE_SCHEMA), quote_ident(TG_TABLE_NAME), TG_ARGV[0]
            using errcode = 'read_only_sql_transaction',
                  hint = 'write on the provider, or run "ferry CONF subscriber remove TABLE" to stop replicating it';
    end if;
    return null;
end $$;
comment on function "ferry"."protect_replica"() is
    'ferry: statement trigger that makes a replicated table read-only for all but replay';

-- Puts the write guard ("ferry_protect") on table i_table and, when it is partitioned, on
-- each of its partitions (statement triggers are not cloned, and a partition can be written
-- directly), or, with i_queue_name null, takes it off them all.
create or replace function "ferry"."subscriber_protect"(i_table oid, i_queue_name text)
returns void language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_rel record;
begin
    for v_rel in
        select n.nspname, c.relname
          from pg_class c join pg_namespace n on n.oid = c.relnamespace
         where c.oid = i_table
            or ((select relkind from pg_class where oid = i_table) = 'p'
                and c.oid in (select t.relid from pg_partition_tree(i_table) t))
    loop
        execute format('drop trigger if exists "ferry_protect" on %I.%I', v_rel.nspname, v_rel.relname);
        if i_queue_name is not null then
            execute format('create trigger "ferry_protect" before insert or update or delete or truncate on %I.%I '
                           'for each statement execute procedure "ferry"."protect_replica"(%L)',
                           v_rel.nspname, v_rel.relname, i_queue_name);
        end if;
    end loop;
end $$;
comment on function "ferry"."subscriber_protect"(oid, text) is
    'ferry: put the write guard on a replicated table and its partitions (or take it off)';

-- Registers a subscriber table for a queue (state in-copy) and protects it. Returns 1 when
-- new, 0 when registered already.
create or replace function "ferry"."subscriber_add_table"(i_queue_name text, i_schema text, i_name text,
    i_skip_truncate boolean default false)
returns integer language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_oid oid := to_regclass(format('%I.%I', i_schema, i_name));
    v_new integer;
begin
    if v_oid is null then
        raise exception 'ferry: table %.% does not exist on the subscriber', quote_ident(i_schema), quote_ident(i_name)
            using errcode = 'undefined_table',
                  hint = 'create it (pg_dump -s of the provider), or add it with --create';
    end if;
    if not exists (select 1 from "ferry"."subscriber_position" where "queue_name" = i_queue_name) then
        raise exception 'ferry: queue "%" is not set up on this subscriber', i_queue_name
            using errcode = 'undefined_object', hint = 'run "ferry CONF subscriber install" first';
    end if;
    perform "ferry"."subscriber_protect"(v_oid, i_queue_name);
    insert into "ferry"."subscriber_table" ("queue_name", "table_schema", "table_name", "skip_truncate")
    values (i_queue_name, i_schema, i_name, i_skip_truncate)
    on conflict do nothing;
    get diagnostics v_new = row_count;
    return v_new;
end $$;
comment on function "ferry"."subscriber_add_table"(text, text, text, boolean) is
    'ferry: replicate a table into this subscriber, starting with its copy (1 new, 0 already)';

-- Stops replicating a table here and lifts its protection. Returns 0 when it was not registered.
create or replace function "ferry"."subscriber_remove_table"(i_queue_name text, i_schema text, i_name text)
returns integer language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_gone integer;
begin
    delete from "ferry"."subscriber_table"
     where "queue_name" = i_queue_name and "table_schema" = i_schema and "table_name" = i_name;
    get diagnostics v_gone = row_count;
    -- events kept for a copy that will never be applied now
    delete from "ferry"."subscriber_stash"
     where "queue_name" = i_queue_name and "table_schema" = i_schema and "table_name" = i_name;
    if to_regclass(format('%I.%I', i_schema, i_name)) is not null then
        perform "ferry"."subscriber_protect"(to_regclass(format('%I.%I', i_schema, i_name)), null);
    end if;
    return v_gone;
end $$;
comment on function "ferry"."subscriber_remove_table"(text, text, text) is
    'ferry: stop replicating a table into this subscriber (1 removed, 0 was not registered)';

-- Sends a table back to in-copy: replay copies it again. Returns 0 when it is not registered.
-- The snapshot of a copy running or cut short is forgotten with the events kept for it: the
-- next copy starts afresh (its snapshot sees every transaction committed before this call).
create or replace function "ferry"."subscriber_resync_table"(i_queue_name text, i_schema text, i_name text)
returns integer language sql as $$
    with forgotten as (
        delete from "ferry"."subscriber_stash"
         where "queue_name" = i_queue_name and "table_schema" = i_schema and "table_name" = i_name),
    changed as (
        update "ferry"."subscriber_table"
           set "state" = 'in-copy', "copy_snapshot" = null, "copied_rows" = null, "state_changed" = now()
         where "queue_name" = i_queue_name and "table_schema" = i_schema and "table_name" = i_name
        returning 1)
    select count(*)::integer from changed
$$;
comment on function "ferry"."subscriber_resync_table"(text, text, text) is
    'ferry: copy a replicated table again (1 done, 0 not registered)';

-- Puts the calling session in session_replication_role = replica, as native logical
-- replication applies changes: ordinary and foreign-key triggers (and rules) do not fire for
-- replay's writes; triggers marked ENABLE REPLICA or ENABLE ALWAYS do. Replay sets the
-- parameter itself where its role may (a superuser, or PostgreSQL 15+ with GRANT SET ON
-- PARAMETER session_replication_role); on PostgreSQL 12 to 14 a superuser can instead take
-- ownership of this security-definer function and grant EXECUTE on it to the subscriber role
-- (README, "Privileges"). It is created once and never replaced, so that a superuser's
-- ownership survives every later `subscriber install`; EXECUTE is not public.
do $replica$
begin
    if to_regprocedure('"ferry"."replica_session"()') is null then
        execute $create$
            create function "ferry"."replica_session"() returns void
            language plpgsql security definer set search_path = pg_catalog, pg_temp as $body$
            begin
                -- session-wide (not local): it outlives the function and its SET clause
                perform pg_catalog.set_config('session_replication_role', 'replica', false);
            end $body$
        $create$;
        revoke all on function "ferry"."replica_session"() from public;
        comment on function "ferry"."replica_session"() is
            'ferry: session_replication_role = replica for the calling session (replay); owned by a superuser on PostgreSQL 12 to 14';
    end if;
end $replica$;

-- Drops ferry's capture triggers that a schema dump of a provider brought along (`pg_dump -s`
-- of a database where ferry runs, as the seed adds a subscriber): triggers calling ferry's
-- capture functions on tables no queue here captures (no row in "ferry"."provider_table").
-- Replay's replica mode keeps them from firing, but once a table stops being replicated here
-- they would make every write to it fail for want of their queue. Returns each such trigger,
-- and whether it was dropped: dropping needs the table's owner, which the subscriber role may
-- not be; the caller then says what to run.
create or replace function "ferry"."subscriber_drop_copied_capture_triggers"(
    out table_schema text, out table_name text, out trigger_name text, out dropped boolean)
returns setof record
language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_registered boolean;
begin
    for table_schema, table_name, trigger_name in
        select n.nspname::text, c.relname::text, g.tgname::text
          from pg_trigger g
          join pg_class c on c.oid = g.tgrelid
          join pg_namespace n on n.oid = c.relnamespace
          join pg_proc p on p.oid = g.tgfoid
          join pg_namespace pn on pn.oid = p.pronamespace
         where not g.tgisinternal and pn.nspname = 'ferry'
           and (p.proname ~ '^capture_(truncate(_root|_partition|_end)?|key_change)$' or p.proname ~ '^capture_[0-9]+_[0-9]+$')
           -- not a partition's clone of its root's trigger (PostgreSQL 13+; 12 marks clones
           -- internal): it goes with the root's
           and coalesce((to_jsonb(g) ->> 'tgparentid')::oid, 0) = 0
         order by 1, 2, 3
    loop
        v_registered := false;
        if to_regclass('"ferry"."provider_table"') is not null then
            execute 'select exists (select 1 from "ferry"."provider_table"
                                     where "table_schema" = $1 and "table_name" = $2)'
               into v_registered using table_schema, table_name;
        end if;
        continue when v_registered;
        begin
            execute format('drop trigger %I on %I.%I', trigger_name, table_schema, table_name);
            dropped := true;
        exception when insufficient_privilege then
            dropped := false;
        end;
        return next;
    end loop;
end $$;
comment on function "ferry"."subscriber_drop_copied_capture_triggers"() is
    'ferry: drop capture triggers a provider''s schema dump brought to tables nothing captures here';

-- Replay on this subscriber, per queue, for any monitoring tool (shaped like
-- pg_stat_subscription): paused or not, the last tick applied and when, the error holding it up
-- (null while work goes on), and how many of its tables are ok.
create or replace view "ferry"."stat_subscription" as
select p."queue_name", p."consumer", p."paused", p."last_tick_id", p."updated" as "last_applied",
       p."last_error", p."last_error_at",
       count(t."table_name") as "tables",
       count(t."table_name") filter (where t."state" = 'ok') as "tables_ok"
  from "ferry"."subscriber_position" p
  left join "ferry"."subscriber_table" t on t."queue_name" = p."queue_name"
 group by p."queue_name";
comment on view "ferry"."stat_subscription" is
    'ferry: replay on this subscriber per queue (paused, last tick applied, last error, tables ok)';

-- The initial copies running on this subscriber, shaped like pg_stat_progress_copy: rows and
-- bytes copied, rows the provider's statistics expect, the rate so far and the seconds left
-- at that rate. Replay updates the row twice a second.
create or replace view "ferry"."stat_copy" as
select p."queue_name", p."table_schema", p."table_name", p."started_at", p."updated_at",
       p."rows_done", p."bytes_done", p."rows_expected",
       r.rows_per_sec,
       case when p."rows_expected" is not null and r.rows_per_sec > 0
            then greatest(p."rows_expected" - p."rows_done", 0) / r.rows_per_sec end as "eta_secs"
  from "ferry"."subscriber_copy_progress" p
  join "ferry"."subscriber_table" t using ("queue_name", "table_schema", "table_name")
  cross join lateral (
      select p."rows_done" / nullif(extract(epoch from p."updated_at" - p."started_at"), 0)::float8
             as rows_per_sec) r
 where t."state" = 'in-copy';
comment on view "ferry"."stat_copy" is
    'ferry: initial copies running here (rows and bytes done, rows expected, rate, eta)';
