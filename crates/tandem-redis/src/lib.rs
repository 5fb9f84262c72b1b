//! Tandem's shared state in Redis: what gateway replicas behind one load
//! balancer must agree on — the key registry, per-key rate limits, today's
//! spending against budgets, and the semantic cache's entries — kept where
//! every replica reads and writes it ([`RedisState`] implements
//! [`tandem_router::shared::SharedStore`]).
//!
//! Every change that a race could break is one Lua script, run atomically
//! by Redis on Redis's own clock: admitting a key and taking a token from
//! its bucket; reserving a request's possible cost against budgets; settling
//! it. Layout, under the configured prefix (default `tandem:`):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `keys` | hash | key hash → key configuration (JSON) |
//! | `keynames` | hash | key name → key hash |
//! | `revoked` | set | names revoked through the API (not re-seeded) |
//! | `rate:<hash>` | hash | token bucket: `tokens`, `last` (ms) |
//! | `spend:<day>` | hash | `spent`, `held`, `spent:<name>`, `held:<name>` (USD) |
//! | `cache` | stream | cache entries: `origin`, `entry` |

use std::time::Duration;

use redis::AsyncCommands as _;
use redis::aio::ConnectionManager;
use tandem_router::access::KeyConfig;
use tandem_router::shared::{Admission, AdmitAsk, CacheLine, SharedConfig, SharedStore, SpendNow};
use tokio::sync::OnceCell;

/// Spending of a day is kept for two more (a day ends at UTC midnight on
/// every replica at once, but clocks differ a little).
const SPEND_TTL_S: i64 = 3 * 86_400;

/// KEYS: keys, rate:<hash>, spend:<day>. ARGV: hash, advance, budget, TTL.
/// Returns {verdict, config, spent in all, spent by the key, advance held}
/// (spent counts what is reserved, the advance included).
const ADMIT: &str = r"
local cfg = redis.call('HGET', KEYS[1], ARGV[1])
if not cfg then return {0} end
local ok, k = pcall(cjson.decode, cfg)
if not ok then return {0} end
local function spent()
  local v = redis.call('HMGET', KEYS[3], 'spent', 'held', 'spent:' .. k['name'], 'held:' .. k['name'])
  local function n(x) return tonumber(x or '0') or 0 end
  return tostring(n(v[1]) + n(v[2])), tostring(n(v[3]) + n(v[4]))
end
-- ARGV[2]: the advance to hold; ARGV[3]: the gateway's budget ('' none).
local function advance()
  local want = tonumber(ARGV[2]) or 0
  if want <= 0 then return 0 end
  local kb = k['daily_budget_usd']
  if kb == cjson.null then kb = nil end
  local gb = tonumber(ARGV[3])
  if kb == nil and gb == nil then return 0 end
  local v = redis.call('HMGET', KEYS[3], 'spent', 'held', 'spent:' .. k['name'], 'held:' .. k['name'])
  local function n(x) return tonumber(x or '0') or 0 end
  if gb ~= nil and n(v[1]) + n(v[2]) >= gb then return 0 end
  if kb ~= nil and n(v[3]) + n(v[4]) >= tonumber(kb) then return 0 end
  redis.call('HINCRBYFLOAT', KEYS[3], 'held', want)
  redis.call('HINCRBYFLOAT', KEYS[3], 'held:' .. k['name'], want)
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  return want
end
local rpm = k['rate_limit_per_minute']
if rpm == nil or rpm == cjson.null then
  local held = advance()
  local total, mine = spent()
  return {1, cfg, total, mine, tostring(held)}
end
local cap = math.max(tonumber(rpm), 1)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[2], 'tokens', 'last')
local tokens = tonumber(b[1]) or cap
local last = tonumber(b[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - last) * cap / 60000)
local verdict = 2
if tokens >= 1 then
  tokens = tokens - 1
  verdict = 1
end
redis.call('HSET', KEYS[2], 'tokens', string.format('%.6f', tokens), 'last', now)
redis.call('PEXPIRE', KEYS[2], 120000)
local held = 0
if verdict == 1 then held = advance() end
local total, mine = spent()
return {verdict, cfg, total, mine, tostring(held)}
";

const SEED: &str = r"
for i = 1, #ARGV, 3 do
  local name, hash, cfg = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('SISMEMBER', KEYS[3], name) == 0 then
    local old = redis.call('HGET', KEYS[2], name)
    if old and old ~= hash then redis.call('HDEL', KEYS[1], old) end
    redis.call('HSET', KEYS[2], name, hash)
    redis.call('HSET', KEYS[1], hash, cfg)
  end
end
return 1
";

const CREATE: &str = r"
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
";

const UPDATE: &str = r"
local hash = redis.call('HGET', KEYS[2], ARGV[1])
if not hash or hash ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], hash, ARGV[3])
return 1
";

const REVOKE: &str = r"
redis.call('SADD', KEYS[3], ARGV[1])
local hash = redis.call('HGET', KEYS[2], ARGV[1])
if not hash then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], hash)
return 1
";

/// ARGV: usd, budget ('' = none), key name ('' = none), key budget.
const RESERVE: &str = r"
local function num(field) return tonumber(redis.call('HGET', KEYS[1], field) or '0') or 0 end
local usd = tonumber(ARGV[1])
if ARGV[2] ~= '' and num('spent') + num('held') >= tonumber(ARGV[2]) then return 0 end
if ARGV[3] ~= '' and ARGV[4] ~= '' and
   num('spent:' .. ARGV[3]) + num('held:' .. ARGV[3]) >= tonumber(ARGV[4]) then return 0 end
redis.call('HINCRBYFLOAT', KEYS[1], 'held', usd)
if ARGV[3] ~= '' then redis.call('HINCRBYFLOAT', KEYS[1], 'held:' .. ARGV[3], usd) end
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
";

/// ARGV: reserved, spent, key name ('' = none).
const SETTLE: &str = r"
local r, s = tonumber(ARGV[1]), tonumber(ARGV[2])
local function sub(field)
  local v = tonumber(redis.call('HGET', KEYS[1], field) or '0') or 0
  redis.call('HSET', KEYS[1], field, string.format('%.12f', math.max(0, v - r)))
end
if r > 0 then
  sub('held')
  if ARGV[3] ~= '' then sub('held:' .. ARGV[3]) end
end
if s > 0 then
  redis.call('HINCRBYFLOAT', KEYS[1], 'spent', s)
  if ARGV[3] ~= '' then redis.call('HINCRBYFLOAT', KEYS[1], 'spent:' .. ARGV[3], s) end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
";

/// Shared state in one Redis (or a primary behind Sentinel's address).
pub struct RedisState {
    client: redis::Client,
    /// Made on first use, so that a replica starts while Redis is down.
    conn: OnceCell<ConnectionManager>,
    prefix: String,
    where_: String,
    cache_max: usize,
    timeout: Duration,
    admit: redis::Script,
    seed: redis::Script,
    create: redis::Script,
    update: redis::Script,
    revoke: redis::Script,
    reserve: redis::Script,
    settle: redis::Script,
}

impl RedisState {
    /// A store at `config.redis_url`; keeps at most `cache_max` cache
    /// entries in the shared log. Nothing is contacted yet.
    pub fn new(config: &SharedConfig, cache_max: usize) -> Result<RedisState, String> {
        let url = config
            .redis_url
            .as_deref()
            .ok_or("[shared] needs redis_url")?;
        let client = redis::Client::open(url).map_err(|e| format!("redis_url: {e}"))?;
        let info = client.get_connection_info();
        let where_ = format!("redis at {}", info.addr());
        Ok(RedisState {
            client,
            conn: OnceCell::new(),
            prefix: config.prefix.clone(),
            where_,
            cache_max: cache_max.max(1),
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
            admit: redis::Script::new(ADMIT),
            seed: redis::Script::new(SEED),
            create: redis::Script::new(CREATE),
            update: redis::Script::new(UPDATE),
            revoke: redis::Script::new(REVOKE),
            reserve: redis::Script::new(RESERVE),
            settle: redis::Script::new(SETTLE),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    async fn conn(&self) -> Result<ConnectionManager, String> {
        self.conn
            .get_or_try_init(|| async {
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(|e| e.to_string())
            })
            .await
            .cloned()
    }

    fn registry(&self) -> [String; 3] {
        [self.key("keys"), self.key("keynames"), self.key("revoked")]
    }

    /// Runs a registry script on one key's name, hash and configuration;
    /// whether it did what it was asked.
    async fn write_key(&self, script: &redis::Script, key: &KeyConfig) -> Result<bool, String> {
        let mut c = self.conn().await?;
        let [k1, k2, k3] = self.registry();
        let done: i64 = script
            .key(k1)
            .key(k2)
            .key(k3)
            .arg(&key.name)
            .arg(&key.hash)
            .arg(config_json(key)?)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(done == 1)
    }
}

fn err(e: redis::RedisError) -> String {
    e.to_string()
}

fn config_json(k: &KeyConfig) -> Result<String, String> {
    serde_json::to_string(k).map_err(|e| e.to_string())
}

fn parse_key(cfg: &str) -> Result<KeyConfig, String> {
    serde_json::from_str(cfg).map_err(|e| format!("a key in Redis is not readable: {e}"))
}

#[async_trait::async_trait]
impl SharedStore for RedisState {
    fn describe(&self) -> String {
        self.where_.clone()
    }

    async fn admit(&self, hash: &str, ask: &AdmitAsk) -> Result<Admission, String> {
        let mut c = self.conn().await?;
        let v: Vec<redis::Value> = self
            .admit
            .key(self.key("keys"))
            .key(self.key(&format!("rate:{hash}")))
            .key(self.key(&format!("spend:{}", ask.day)))
            .arg(hash)
            .arg(format!("{:.12}", ask.advance_usd.max(0.0)))
            .arg(ask.budget.map(|b| format!("{b:.12}")).unwrap_or_default())
            .arg(SPEND_TTL_S)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        let text = |i: usize| match v.get(i) {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        };
        let number = |i: usize| text(i).and_then(|t| t.parse::<f64>().ok()).unwrap_or(0.0);
        match (v.first(), text(1)) {
            (Some(redis::Value::Int(1)), Some(cfg)) => Ok(Admission::Admitted(
                parse_key(&cfg)?,
                SpendNow {
                    total: number(2),
                    key: number(3),
                },
                number(4),
            )),
            (Some(redis::Value::Int(2)), Some(cfg)) => Ok(Admission::Limited(parse_key(&cfg)?)),
            (Some(redis::Value::Int(_)), _) => Ok(Admission::Unknown),
            _ => Err("unexpected answer to the admission script".into()),
        }
    }

    async fn keys(&self) -> Result<Vec<KeyConfig>, String> {
        let mut c = self.conn().await?;
        let all: Vec<String> = c.hvals(self.key("keys")).await.map_err(err)?;
        // One unreadable entry must not hide the others.
        Ok(all.iter().filter_map(|s| parse_key(s).ok()).collect())
    }

    async fn seed_keys(&self, keys: &[KeyConfig]) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut c = self.conn().await?;
        let [k1, k2, k3] = self.registry();
        let mut inv = self.seed.key(k1);
        inv.key(k2).key(k3);
        for k in keys {
            inv.arg(&k.name).arg(&k.hash).arg(config_json(k)?);
        }
        let _: i64 = inv.invoke_async(&mut c).await.map_err(err)?;
        Ok(())
    }

    async fn create_key(&self, key: &KeyConfig) -> Result<bool, String> {
        self.write_key(&self.create, key).await
    }

    async fn update_key(&self, key: &KeyConfig) -> Result<bool, String> {
        self.write_key(&self.update, key).await
    }

    async fn revoke_key(&self, name: &str) -> Result<bool, String> {
        let mut c = self.conn().await?;
        let [k1, k2, k3] = self.registry();
        let found: i64 = self
            .revoke
            .key(k1)
            .key(k2)
            .key(k3)
            .arg(name)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(found == 1)
    }

    async fn spend(&self, day: u64, key: Option<&str>) -> Result<SpendNow, String> {
        let mut c = self.conn().await?;
        let name = key.unwrap_or("");
        let v: Vec<Option<f64>> = redis::cmd("HMGET")
            .arg(self.key(&format!("spend:{day}")))
            .arg("spent")
            .arg("held")
            .arg(format!("spent:{name}"))
            .arg(format!("held:{name}"))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let at = |i: usize| v.get(i).copied().flatten().unwrap_or(0.0);
        Ok(SpendNow {
            total: at(0) + at(1),
            key: if key.is_some() { at(2) + at(3) } else { 0.0 },
        })
    }

    async fn reserve(
        &self,
        day: u64,
        key: Option<&str>,
        usd: f64,
        budget: Option<f64>,
        key_budget: Option<f64>,
    ) -> Result<bool, String> {
        let mut c = self.conn().await?;
        let opt = |v: Option<f64>| v.map(|b| format!("{b:.12}")).unwrap_or_default();
        let granted: i64 = self
            .reserve
            .key(self.key(&format!("spend:{day}")))
            .arg(format!("{usd:.12}"))
            .arg(opt(budget))
            .arg(key.unwrap_or(""))
            .arg(opt(key_budget))
            .arg(SPEND_TTL_S)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(granted == 1)
    }

    async fn settle(
        &self,
        day: u64,
        key: Option<&str>,
        reserved: f64,
        spent: f64,
    ) -> Result<(), String> {
        let mut c = self.conn().await?;
        let _: i64 = self
            .settle
            .key(self.key(&format!("spend:{day}")))
            .arg(format!("{reserved:.12}"))
            .arg(format!("{spent:.12}"))
            .arg(key.unwrap_or(""))
            .arg(SPEND_TTL_S)
            .invoke_async(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn cache_put(&self, origin: &str, entry: &str) -> Result<(), String> {
        let mut c = self.conn().await?;
        let _: String = redis::cmd("XADD")
            .arg(self.key("cache"))
            .arg("MAXLEN")
            .arg("~")
            .arg(self.cache_max)
            .arg("*")
            .arg("origin")
            .arg(origin)
            .arg("entry")
            .arg(entry)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn cache_read(&self, after: &str, max: usize) -> Result<Vec<CacheLine>, String> {
        let mut c = self.conn().await?;
        let start = if after == "0" {
            "-".to_owned()
        } else {
            format!("({after}")
        };
        let rows: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(self.key("cache"))
            .arg(start)
            .arg("+")
            .arg("COUNT")
            .arg(max.max(1))
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(rows
            .into_iter()
            .map(|(id, fields)| {
                let mut line = CacheLine {
                    id,
                    origin: String::new(),
                    entry: String::new(),
                };
                for pair in fields.chunks_exact(2) {
                    match pair[0].as_str() {
                        "origin" => line.origin.clone_from(&pair[1]),
                        "entry" => line.entry.clone_from(&pair[1]),
                        _ => {}
                    }
                }
                line
            })
            .collect())
    }
}
