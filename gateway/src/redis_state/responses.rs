//! Stored Responses API responses in Redis: one string per response,
//! `parley:v1:{<chatbot>:<tenant>}:response:<id>`, written with `SET ... PX ttl` (the
//! session TTL), so another tenant's id is simply absent and every record expires.

use std::time::Duration;

use bytes::Bytes;

use super::Redis;

impl Redis {
    fn response_key(&self, tenant: &str, id: &str) -> String {
        self.tenant_key(tenant, &format!("response:{id}"))
    }

    /// Stores a record for `ttl`; `false` if Redis fails.
    pub async fn response_put(&self, tenant: &str, id: &str, record: &[u8], ttl: Duration) -> bool {
        let mut conn = self.conn.clone();
        self.run(
            "response_put",
            redis::cmd("SET")
                .arg(self.response_key(tenant, id))
                .arg(record)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .query_async::<()>(&mut conn),
        )
        .await
        .is_some()
    }

    /// A stored record (`Some(None)`: none of that id for this tenant); `None` if Redis
    /// fails.
    pub async fn response_get(&self, tenant: &str, id: &str) -> Option<Option<Bytes>> {
        let mut conn = self.conn.clone();
        let raw: Option<Vec<u8>> = self
            .run(
                "response_get",
                redis::cmd("GET")
                    .arg(self.response_key(tenant, id))
                    .query_async(&mut conn),
            )
            .await?;
        Some(raw.map(Bytes::from))
    }

    /// Deletes a record: `Some(true)` if there was one; `None` if Redis fails.
    pub async fn response_delete(&self, tenant: &str, id: &str) -> Option<bool> {
        let mut conn = self.conn.clone();
        let n: i64 = self
            .run(
                "response_delete",
                redis::cmd("DEL")
                    .arg(self.response_key(tenant, id))
                    .query_async(&mut conn),
            )
            .await?;
        Some(n > 0)
    }
}
