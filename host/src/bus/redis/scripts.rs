//! The Lua scripts: each does one step of a delivery's life atomically, in
//! one round trip, so that no crash between two commands loses or doubles
//! anything.

use ::redis::Script;

/// Why a list may not be pushed onto: the transport's own keys (kombu's
/// unacked hash, index and lock, its binding tables, our held sets) and
/// any key that exists and is not a list. Shared by every script that
/// pushes; the Rust twin for names alone is [`super::keys::reserved`].
const REFUSAL: &str = r"
local function refusal(key)
  if key == 'unacked' or key == 'unacked_index' or key == 'unacked_mutex' then
    return key .. ' is a key of the transport itself'
  end
  if string.sub(key, 1, 7) == '_kombu.' then
    return key .. ' is a kombu binding table'
  end
  if string.sub(key, 1, 22) == 'commissaire-host.held.' then
    return key .. ' is the held set of a consumer'
  end
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'none' and t ~= 'list' then
    return key .. ' holds a ' .. t .. ', not a list'
  end
  return nil
end
";

/// Takes up to `ARGV[1]` messages off a queue's lists, in order, and
/// records each as unacked (kombu's hash and index) and held by this
/// consumer, under tags `ARGV[2]..(ARGV[3] + n)`; returns a flag, then the
/// messages. A message is never out of its list without its record (the
/// keys' types are checked before anything moves: a script stopped by an
/// error keeps what it did).
///
/// The held set also holds a *mark* (`ARGV[7]`) while it holds anything:
/// a record gone with its mark still there was handed back, one gone with
/// its mark was lost with the database (see `REPLY_ACK`). When the caller
/// expects its mark (`ARGV[8]` = `1`) and it is gone, the database lost
/// this consumer's records (a restart without persistence, a `FLUSHDB`):
/// the take uses the new mark `ARGV[9]` and the flag is `1`, else `0`.
///
/// KEYS: unacked, unacked_index, held set, the queue's lists.
/// ARGV: count, tag prefix, first sequence number, record suffix
/// (`, "", "<queue>"]`), now, held set expiry (ms), mark, whether it is
/// expected, the mark to use if it was lost.
const TAKE: &str = r"
local kinds = {'hash', 'zset', 'set'}
for i = 1, #KEYS do
  local want = kinds[i] or 'list'
  local t = redis.call('TYPE', KEYS[i])['ok']
  if t ~= 'none' and t ~= want then
    return redis.error_reply(KEYS[i] .. ' holds a ' .. t .. ', not a ' .. want)
  end
end
local mark = ARGV[7]
local out = {'0'}
if ARGV[8] == '1' and redis.call('SISMEMBER', KEYS[3], mark) == 0 then
  mark = ARGV[9]
  out[1] = '1'
end
local want = tonumber(ARGV[1])
local seq = tonumber(ARGV[3])
for i = 4, #KEYS do
  if want <= 0 then break end
  local items = redis.call('RPOP', KEYS[i], want)
  if items then
    for _, item in ipairs(items) do
      local tag = ARGV[2] .. string.format('%d', seq)
      seq = seq + 1
      redis.call('HSET', KEYS[1], tag, '[' .. item .. ARGV[4])
      redis.call('ZADD', KEYS[2], ARGV[5], tag)
      redis.call('SADD', KEYS[3], tag)
      out[#out + 1] = item
    end
    want = want - #items
  end
end
if #out > 1 then
  redis.call('SADD', KEYS[3], mark)
  redis.call('PEXPIRE', KEYS[3], ARGV[6])
end
return out
";

/// Publishes: pushes the envelope onto every list, unless one of them is
/// refused (then onto none), and sets the lists to expire after `ARGV[2]`
/// ms unless it is 0 (a reply: see `Outgoing::reply_ttl`); returns 0, or
/// why it was refused.
///
/// KEYS: the lists. ARGV: the envelope, the expiry (ms, 0 for none).
const PUBLISH: &str = r"
for i = 1, #KEYS do
  local why = refusal(KEYS[i])
  if why then return why end
end
for i = 1, #KEYS do
  redis.call('LPUSH', KEYS[i], ARGV[1])
  local ttl = tonumber(ARGV[2] or '0') or 0
  if ttl > 0 then redis.call('PEXPIRE', KEYS[i], ttl) end
end
return 0
";

/// Publishes through an exchange's binding set, as routed by the caller
/// from the members it had read: if the set still holds exactly those
/// members, pushes the envelope onto every list (unless one is refused:
/// then onto none) and returns 0; otherwise pushes nothing and returns the
/// set's members, to route with and try again. So a publish reads the
/// bindings and pushes in one round trip, and never pushes by a binding
/// table that changed in between (kombu reads, then pushes).
///
/// KEYS: the binding set, the lists. ARGV: the envelope, `1` if the
/// members follow (`0`: the caller has none yet), the members.
const PUBLISH_ROUTED: &str = r"
local members = redis.call('SMEMBERS', KEYS[1])
local current = ARGV[2] == '1' and #members == #ARGV - 2
if current then
  local expected = {}
  for i = 3, #ARGV do expected[ARGV[i]] = true end
  for _, m in ipairs(members) do
    if not expected[m] then current = false break end
  end
end
if not current then return members end
for i = 2, #KEYS do
  local why = refusal(KEYS[i])
  if why then return why end
end
for i = 2, #KEYS do
  redis.call('LPUSH', KEYS[i], ARGV[1])
end
return 0
";

/// Replies and acks at once: pushes the reply onto its list and removes
/// the request's record. Returns 0 once done; 2, doing nothing, if the
/// record is gone but the mark it was taken under is still held (the
/// request was handed back to its queue, where its next holder answers
/// it: replying too would answer it twice); 3 once the reply is pushed
/// for a record gone with its mark (the database lost both: nobody else
/// holds the request, so it is answered here); or why the reply list was
/// refused (nothing done).
///
/// The reply list expires after `ARGV[4]` ms unread unless it is 0 (see
/// `Outgoing::reply_ttl`).
///
/// KEYS: reply list, unacked, unacked_index, held set.
/// ARGV: the reply's envelope, the request's tag, the mark it was taken
/// under, the list's expiry (ms).
const REPLY_ACK: &str = r"
local ttl = tonumber(ARGV[4] or '0') or 0
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  if redis.call('SISMEMBER', KEYS[4], ARGV[3]) == 1 then return 2 end
  local why = refusal(KEYS[1])
  if why then return why end
  redis.call('LPUSH', KEYS[1], ARGV[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
  return 3
end
local why = refusal(KEYS[1])
if why then return why end
redis.call('LPUSH', KEYS[1], ARGV[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('HDEL', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('SREM', KEYS[4], ARGV[2])
return 0
";

/// Restores one unacked delivery, as kombu's `QoS.restore_by_tag`: if the
/// hash still holds what the caller read, removes the record (and the tag
/// from its held set) and pushes the envelope, marked redelivered, onto
/// the lists (LPUSH for a requeue, to the back of the queue; RPUSH for a
/// restore, to its front). Returns 1 once pushed, 0 if there was nothing
/// to push, or why a list was refused (the record then stays).
///
/// With ARGV[6] `1` (a restore past the visibility timeout), a held set
/// left holding nothing but marks (see `TAKE`) is deleted.
///
/// KEYS: unacked, unacked_index, held set (or any key if ARGV[5] is not
/// `1`), the lists.
/// ARGV: tag, the record as read (`''`: none), the envelope to push,
/// `l` or `r`, whether KEYS[3] is a held set, whether to drop a held set
/// of marks only.
const RESTORE: &str = r"
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and current ~= ARGV[2] then return 0 end
if current then
  for i = 4, #KEYS do
    local why = refusal(KEYS[i])
    if why then return why end
  end
end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if ARGV[5] == '1' then
  redis.call('SREM', KEYS[3], ARGV[1])
  if ARGV[6] == '1' then
    local marks_only = true
    for _, m in ipairs(redis.call('SMEMBERS', KEYS[3])) do
      if string.sub(m, 1, 6) ~= '~mark-' then marks_only = false break end
    end
    if marks_only then redis.call('DEL', KEYS[3]) end
  end
end
if not current then return 0 end
for i = 4, #KEYS do
  if ARGV[4] == 'l' then
    redis.call('LPUSH', KEYS[i], ARGV[3])
  else
    redis.call('RPUSH', KEYS[i], ARGV[3])
  end
end
return 1
";

/// Takes kombu's restore lock (`SET NX PX`, as redis-py's `Lock`). A lock
/// key that is not a string (a reply an older host pushed there made it a
/// list, and `SET NX` would then fail for every consumer for ever) is
/// deleted first. Returns 0 (held by another), 1 (taken) or 2 (taken after
/// deleting a bad lock key).
///
/// KEYS: unacked_mutex. ARGV: token, expiry (ms).
const LOCK: &str = r"
local healed = 0
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'string' then
  redis.call('DEL', KEYS[1])
  healed = 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1 + healed
end
return 0
";

/// redis-py's `Lock.release`, which kombu's `Mutex` uses.
const UNLOCK: &str = r"
local token = redis.call('get', KEYS[1])
if not token or token ~= ARGV[1] then return 0 end
redis.call('del', KEYS[1])
return 1
";

/// The scripts, loaded by hash (`EVALSHA`, falling back to `EVAL`).
pub(super) struct Scripts {
    pub take: Script,
    pub publish: Script,
    pub publish_routed: Script,
    pub reply_ack: Script,
    pub restore: Script,
    pub lock: Script,
    pub unlock: Script,
}

impl Scripts {
    pub fn new() -> Self {
        let refusing = |body: &str| Script::new(&format!("{REFUSAL}{body}"));
        Self {
            take: Script::new(TAKE),
            publish: refusing(PUBLISH),
            publish_routed: refusing(PUBLISH_ROUTED),
            reply_ack: refusing(REPLY_ACK),
            restore: refusing(RESTORE),
            lock: Script::new(LOCK),
            unlock: Script::new(UNLOCK),
        }
    }
}
