-- ferry queue schema, version 3: a consumer's row is updated in place.
--
-- Every batch updates its consumer's row two or three times (next_batch_info, finish_batch).
-- A unique index on sub_batch made each such update write new index entries and leave a dead
-- row behind (no HOT update when an indexed column changes): at fifty batches a second the
-- one-row table grew to thousands of dead rows between autovacuum runs, and every batch paid
-- for scanning them (0.5 ms of the provider's time per next_batch_info call, measured). Batch
-- ids come from "ferry"."batch_id_seq" and are unique without the index; lookups by batch id
-- read the few rows of the table, which page pruning now keeps on one page.
alter table "ferry"."subscription" drop constraint "subscription_sub_batch_key";
