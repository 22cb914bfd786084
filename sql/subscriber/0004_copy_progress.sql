-- ferry subscriber, schema version 4: how far each running initial copy has got. The copy's
-- own transaction is invisible until it commits, so replay writes this twice a second
-- from a session of its own; the copy's commit removes its row. A row left by a copy that
-- failed is replaced when the copy starts again.
create table "ferry"."subscriber_copy_progress" (
    "queue_name"    text not null,
    "table_schema"  text not null,
    "table_name"    text not null,
    "started_at"    timestamptz not null,
    "updated_at"    timestamptz not null,
    "rows_done"     bigint not null,
    "bytes_done"    bigint not null,
    "rows_expected" bigint,
    primary key ("queue_name", "table_schema", "table_name")
);
