-- ferry provider functions: capture triggers and the registry of replicated tables and
-- sequences. Re-applied by every `ferry CONF provider install`.

-- Row capture trigger: one event per inserted, updated or deleted row, in the writer's
-- transaction, into the queue named by the first trigger argument. The remaining arguments
-- are the primary-key columns. Events:
--   I  data = the new row as json
--   U  data = the new row as json, extra2 = the old row's primary key as json
--   D  data = the old row's primary key as json
-- extra1 is always the table as "schema"."name", both parts always quoted (the same text on
-- every server version, unlike quote_ident, whose keyword list grows).
-- Values are rendered the same whatever the writer's session settings: the function pins every
-- setting that changes how a value is written out (json itself renders dates and timestamps
-- in ISO form).
create or replace function "ferry"."capture"() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
set "DateStyle" = 'ISO, YMD'
set "IntervalStyle" = 'postgres'
set "extra_float_digits" = '3'
set "bytea_output" = 'hex'
set "TimeZone" = 'UTC'
set "lc_monetary" = 'C'
as $$
declare
    v_table text := '"' || replace(TG_TABLE_SCHEMA, '"', '""') || '"."' || replace(TG_TABLE_NAME, '"', '""') || '"';
    v_key json;
begin
    if TG_OP = 'INSERT' then
        perform "ferry"."insert_event"(TG_ARGV[0], 'I', row_to_json(NEW)::text, v_table);
        return null;
    end if;
    select json_object_agg(e.key, e.value) into v_key
      from json_each(row_to_json(OLD)) e
     where e.key = any (TG_ARGV[1:]);
    if TG_OP = 'UPDATE' then
        perform "ferry"."insert_event"(TG_ARGV[0], 'U', row_to_json(NEW)::text, v_table, v_key::text);
    else
        perform "ferry"."insert_event"(TG_ARGV[0], 'D', v_key::text, v_table);
    end if;
    return null;
end $$;
comment on function "ferry"."capture"() is
    'ferry: row trigger writing one event per changed row into the queue named by its first argument';

-- Statement trigger: one T event per TRUNCATE of a replicated table.
create or replace function "ferry"."capture_truncate"() returns trigger
language plpgsql set search_path = pg_catalog, pg_temp as $$
begin
    perform "ferry"."insert_event"(TG_ARGV[0], 'T', null,
        '"' || replace(TG_TABLE_SCHEMA, '"', '""') || '"."' || replace(TG_TABLE_NAME, '"', '""') || '"');
    return null;
end $$;
comment on function "ferry"."capture_truncate"() is
    'ferry: statement trigger writing one T event per TRUNCATE';

-- The names of a queue's capture triggers (row and truncate), at most 63 bytes each.
create or replace function "ferry"."capture_trigger_names"(i_queue_name text, out row_trigger text, out truncate_trigger text)
language sql immutable as $$
    select left('ferry_capture_' || i_queue_name, 63), left('ferry_truncate_' || i_queue_name, 63)
$$;
comment on function "ferry"."capture_trigger_names"(text) is
    'ferry: names of the capture triggers a queue puts on its tables';

-- Registers a table with a queue and (re)creates its capture triggers. Refuses what is not an
-- ordinary table and a table without a primary key. Returns 1 when newly added, 0 when it was
-- registered already (its triggers are recreated, so a changed primary key is picked up).
create or replace function "ferry"."provider_add_table"(i_queue_name text, i_table text)
returns integer language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_oid oid;
    v_schema text;
    v_name text;
    v_kind "char";
    v_pk text[];
    v_trg record;
    v_args text;
    v_new integer;
begin
    if not exists (select 1 from "ferry"."queue" where "queue_name" = i_queue_name) then
        raise exception 'ferry: queue "%" does not exist', i_queue_name
            using errcode = 'undefined_object', hint = 'run "ferry CONF provider install" first';
    end if;
    v_oid := to_regclass(i_table);
    if v_oid is null then
        raise exception 'ferry: table % does not exist on the provider', i_table using errcode = 'undefined_table';
    end if;
    select n.nspname, c.relname, c.relkind into v_schema, v_name, v_kind
      from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = v_oid;
    if v_kind <> 'r' then
        raise exception 'ferry: %.% is not an ordinary table', quote_ident(v_schema), quote_ident(v_name)
            using errcode = 'wrong_object_type';
    end if;
    select array_agg(a.attname::text order by k.ord) into v_pk
      from pg_index i
      cross join lateral unnest(i.indkey) with ordinality k(attnum, ord)
      join pg_attribute a on a.attrelid = i.indrelid and a.attnum = k.attnum
     where i.indrelid = v_oid and i.indisprimary;
    if v_pk is null then
        raise exception 'ferry: table %.% has no primary key', quote_ident(v_schema), quote_ident(v_name)
            using errcode = 'object_not_in_prerequisite_state',
                  hint = 'replication finds rows on the subscriber by primary key: add one (ALTER TABLE ... ADD PRIMARY KEY) and run the add again';
    end if;
    v_trg := "ferry"."capture_trigger_names"(i_queue_name);
    execute format('drop trigger if exists %I on %I.%I', v_trg.row_trigger, v_schema, v_name);
    execute format('drop trigger if exists %I on %I.%I', v_trg.truncate_trigger, v_schema, v_name);
    select string_agg(quote_literal(a), ', ') into v_args from unnest(i_queue_name || v_pk) a;
    execute format('create trigger %I after insert or update or delete on %I.%I for each row execute procedure "ferry"."capture"(%s)',
                   v_trg.row_trigger, v_schema, v_name, v_args);
    execute format('create trigger %I after truncate on %I.%I for each statement execute procedure "ferry"."capture_truncate"(%s)',
                   v_trg.truncate_trigger, v_schema, v_name, quote_literal(i_queue_name));
    insert into "ferry"."provider_table" ("queue_name", "table_schema", "table_name")
    values (i_queue_name, v_schema, v_name)
    on conflict do nothing;
    get diagnostics v_new = row_count;
    return v_new;
end $$;
comment on function "ferry"."provider_add_table"(text, text) is
    'ferry: register a table with a queue and create its capture triggers (1 new, 0 refreshed)';

-- Unregisters a table and drops its capture triggers. Returns 0 when it was not registered.
create or replace function "ferry"."provider_remove_table"(i_queue_name text, i_schema text, i_name text)
returns integer language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_trg record;
    v_gone integer;
begin
    delete from "ferry"."provider_table"
     where "queue_name" = i_queue_name and "table_schema" = i_schema and "table_name" = i_name;
    get diagnostics v_gone = row_count;
    if to_regclass(format('%I.%I', i_schema, i_name)) is not null then
        v_trg := "ferry"."capture_trigger_names"(i_queue_name);
        execute format('drop trigger if exists %I on %I.%I', v_trg.row_trigger, i_schema, i_name);
        execute format('drop trigger if exists %I on %I.%I', v_trg.truncate_trigger, i_schema, i_name);
    end if;
    return v_gone;
end $$;
comment on function "ferry"."provider_remove_table"(text, text, text) is
    'ferry: stop capturing a table into a queue (1 removed, 0 was not registered)';

-- Registers a sequence with a queue. Returns 1 when new, 0 when registered already.
create or replace function "ferry"."provider_add_seq"(i_queue_name text, i_seq text)
returns integer language plpgsql set search_path = pg_catalog, pg_temp as $$
declare
    v_oid oid;
    v_schema text;
    v_name text;
    v_kind "char";
    v_new integer;
begin
    if not exists (select 1 from "ferry"."queue" where "queue_name" = i_queue_name) then
        raise exception 'ferry: queue "%" does not exist', i_queue_name
            using errcode = 'undefined_object', hint = 'run "ferry CONF provider install" first';
    end if;
    v_oid := to_regclass(i_seq);
    if v_oid is null then
        raise exception 'ferry: sequence % does not exist on the provider', i_seq using errcode = 'undefined_table';
    end if;
    select n.nspname, c.relname, c.relkind into v_schema, v_name, v_kind
      from pg_class c join pg_namespace n on n.oid = c.relnamespace where c.oid = v_oid;
    if v_kind <> 'S' then
        raise exception 'ferry: %.% is not a sequence', quote_ident(v_schema), quote_ident(v_name)
            using errcode = 'wrong_object_type';
    end if;
    insert into "ferry"."provider_seq" ("queue_name", "seq_schema", "seq_name")
    values (i_queue_name, v_schema, v_name)
    on conflict do nothing;
    get diagnostics v_new = row_count;
    return v_new;
end $$;
comment on function "ferry"."provider_add_seq"(text, text) is
    'ferry: register a sequence with a queue (1 new, 0 registered already)';

-- Unregisters a sequence. Returns 0 when it was not registered.
create or replace function "ferry"."provider_remove_seq"(i_queue_name text, i_schema text, i_name text)
returns integer language sql as $$
    with gone as (
        delete from "ferry"."provider_seq"
         where "queue_name" = i_queue_name and "seq_schema" = i_schema and "seq_name" = i_name
        returning 1)
    select count(*)::integer from gone
$$;
comment on function "ferry"."provider_remove_seq"(text, text, text) is
    'ferry: unregister a sequence (1 removed, 0 was not registered)';

-- Every ordinary table (relkind r) or sequence (relkind S) outside ferry's own and the system
-- schemas and not part of an extension: what `--all` means on the provider.
create or replace function "ferry"."provider_candidates"(i_relkind "char", out table_schema text, out table_name text)
returns setof record language sql stable as $$
    select n.nspname::text, c.relname::text
      from pg_class c join pg_namespace n on n.oid = c.relnamespace
     where c.relkind = i_relkind
       and not c.relispartition
       and n.nspname not in ('ferry', 'pg_catalog', 'information_schema', 'pgq', 'londiste', 'pgq_node', 'pgq_ext')
       and n.nspname not like 'pg\_toast%' and n.nspname not like 'pg\_temp%'
       and not exists (select 1 from pg_depend d
                        where d.classid = 'pg_class'::regclass and d.objid = c.oid and d.deptype = 'e')
     order by 1, 2
$$;
comment on function "ferry"."provider_candidates"("char") is
    'ferry: user tables (r) or sequences (S) that --all registers';

-- Current values of a queue's registered sequences (skipping ones dropped since).
create or replace function "ferry"."provider_seq_values"(i_queue_name text,
    out seq_schema text, out seq_name text, out last_value bigint, out is_called boolean, out increment bigint)
returns setof record language plpgsql stable set search_path = pg_catalog, pg_temp as $$
declare
    v_seq record;
begin
    for v_seq in
        select s."seq_schema", s."seq_name" from "ferry"."provider_seq" s
         where s."queue_name" = i_queue_name
           and to_regclass(format('%I.%I', s."seq_schema", s."seq_name")) is not null
         order by 1, 2
    loop
        seq_schema := v_seq."seq_schema";
        seq_name := v_seq."seq_name";
        execute format('select last_value, is_called from %I.%I', seq_schema, seq_name)
           into last_value, is_called;
        select p.increment_by into increment from pg_sequences p
         where p.schemaname = seq_schema and p.sequencename = seq_name;
        return next;
    end loop;
end $$;
comment on function "ferry"."provider_seq_values"(text) is
    'ferry: last_value, is_called and increment of each sequence registered with the queue';
