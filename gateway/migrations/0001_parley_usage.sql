-- The usage ledger: one row per request the gateway answered (refused and failed ones
-- included). Money is exact: cost_usd is NUMERIC with six decimals (micro-USD).
CREATE TABLE IF NOT EXISTS parley_usage (
    request_id      text        PRIMARY KEY,
    created_at      timestamptz NOT NULL,
    namespace       text        NOT NULL,
    chatbot         text        NOT NULL,
    tenant          text        NOT NULL,
    api             text        NOT NULL,
    requested_model text        NOT NULL,
    model           text        NOT NULL,
    backend         text        NOT NULL,
    input_tokens    bigint      NOT NULL,
    output_tokens   bigint      NOT NULL,
    cost_usd        numeric(20, 6) NOT NULL,
    latency_ms      bigint      NOT NULL,
    status          smallint    NOT NULL,
    cache_hit       boolean     NOT NULL,
    stream          boolean     NOT NULL
);

-- A tenant's spend over a period (the month's budget at start, /admin/usage).
CREATE INDEX IF NOT EXISTS parley_usage_by_tenant
    ON parley_usage (namespace, chatbot, tenant, created_at);
