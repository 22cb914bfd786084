//! Statements a session prepares once and runs at every batch: replay's bookkeeping queries
//! on the subscriber (its position, pause and table states). A typed query is parsed and
//! planned again at each call; fifty batches a second, that planning was most of what these
//! queries cost the subscriber.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Error, GenericClient, Row, Statement};

/// The statements one session has prepared, by their SQL text. They live as long as the
/// session: forget them ([`Prepared::clear`]) on reconnecting, and after an error (a statement
/// whose tables changed shape fails until prepared again).
#[derive(Default)]
pub struct Prepared {
    statements: Mutex<HashMap<&'static str, Statement>>,
}

impl Prepared {
    /// Forgets every statement.
    pub fn clear(&mut self) {
        self.statements
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// The statement for `sql` on `client`'s session, prepared at its first use.
    async fn statement(
        &self,
        client: &impl GenericClient,
        sql: &'static str,
        types: &[Type],
    ) -> Result<Statement, Error> {
        let known = self
            .statements
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(sql)
            .cloned();
        if let Some(statement) = known {
            return Ok(statement);
        }
        let statement = client.prepare_typed(sql, types).await?;
        self.statements
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(sql, statement.clone());
        Ok(statement)
    }
}

/// Runs `sql` with `params` (each with its type): through the statement `prepared` holds for
/// it when given (parsed and planned once per session), else as a typed query (parsed and
/// planned at this call, nothing kept). Either way one round trip, once prepared.
pub(crate) async fn query(
    client: &impl GenericClient,
    prepared: Option<&Prepared>,
    sql: &'static str,
    params: &[(&(dyn ToSql + Sync), Type)],
) -> Result<Vec<Row>, Error> {
    match prepared {
        None => client.query_typed(sql, params).await,
        Some(prepared) => {
            let types: Vec<Type> = params.iter().map(|(_, t)| t.clone()).collect();
            let values: Vec<&(dyn ToSql + Sync)> = params.iter().map(|(v, _)| *v).collect();
            let statement = prepared.statement(client, sql, &types).await?;
            client.query(&statement, &values).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Given a cache, a query is prepared on the session once and run from then on; without
    /// one nothing is kept.
    #[tokio::test]
    async fn a_query_is_prepared_once_per_session() {
        let db = ferry_testkit::Cluster::shared().database("prepared").await;
        let client = ferry_testkit::connect(&db.conninfo).await;
        let kept = || async {
            let n: i64 = client
                .query_one(
                    "select count(*) from pg_catalog.pg_prepared_statements",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n
        };
        const SQL: &str = "select $1::int4 + 1";
        let before = kept().await;
        let one = query(&client, None, SQL, &[(&1i32, Type::INT4)])
            .await
            .unwrap();
        assert_eq!(one[0].get::<_, i32>(0), 2);
        assert_eq!(kept().await, before, "nothing kept without a cache");
        let mut prepared = Prepared::default();
        for i in 0..3i32 {
            let rows = query(&client, Some(&prepared), SQL, &[(&i, Type::INT4)])
                .await
                .unwrap();
            assert_eq!(rows[0].get::<_, i32>(0), i + 1);
        }
        assert_eq!(kept().await, before + 1, "one statement for three calls");
        prepared.clear();
        query(&client, Some(&prepared), SQL, &[(&7i32, Type::INT4)])
            .await
            .unwrap();
        assert_eq!(
            prepared.statements.lock().unwrap().len(),
            1,
            "prepared again after clear"
        );
    }
}
