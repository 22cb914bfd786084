-- ferry queue schema, version 5: no table changes. The version marks the functions a replay
-- of this ferry needs: consumer_small_batch_events (a consumer's next batch and its events
-- read in one round trip) and events_between_ticks (the query it shares with
-- batch_events_upto). They are in functions.sql, applied by every install; a provider
-- installed by an older ferry is told to run `ferry CONFIG provider install` instead of
-- failing on a missing function.
select 1;
