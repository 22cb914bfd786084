-- ferry queue schema, version 3: a consumer's row is updated in place.
--
-- Every batch updates its consumer's row twice (next_batch_info opens the batch, finish_batch
-- closes it), fifty times a second with the default ticker. A unique index on sub_batch made
-- each of those updates a new row version with new index entries (no HOT update): thousands
-- of dead versions piled up between autovacuum runs, and every lookup of the consumer walked
-- through them (next_batch_info's first query took 0.7 ms instead of 0.02 ms at 1000
-- transactions/s). Without it, no column an update touches is indexed, so every update is
-- HOT and the table stays one page; batch ids stay unique (one sequence hands them out), and
-- a lookup by batch id reads that page.
--
-- From this version on replay also reads small batches with "ferry"."batch_events_upto"
-- (functions.sql).
do $$
declare
    v_name text;
begin
    for v_name in
        select c.conname from pg_catalog.pg_constraint c
         where c.conrelid = '"ferry"."subscription"'::regclass and c.contype = 'u'
           and c.conkey = array[(select a.attnum from pg_catalog.pg_attribute a
                                  where a.attrelid = '"ferry"."subscription"'::regclass
                                    and a.attname = 'sub_batch')]
    loop
        execute pg_catalog.format('alter table "ferry"."subscription" drop constraint %I', v_name);
    end loop;
end $$;
