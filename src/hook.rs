//! The ClientHello callback: where each handshake is allowed or refused.
//!
//! OpenSSL calls it first thing for every ClientHello, resumed sessions included, before the
//! server name is handled, before nginx switches to the selected server's certificates and
//! before any certificate callback. The module installs it on the SSL_CTX of every server of
//! every `http {}` block that has the guard on anywhere; OpenSSL takes it from the context of
//! the listening socket's default server.
//!
//! nginx before 1.29.2 selects the virtual server later, in its servername callback, so the
//! callback works out by itself which server nginx is going to select, with nginx's own lookup
//! tables (exact, wildcard and regex names, default server), and applies that server's settings.

use core::ffi::{c_int, c_void};
use core::ptr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use nginx_sys::{
    ngx_conf_t, ngx_connection_t, ngx_current_msec, ngx_hash_find_combined, ngx_hash_key,
    ngx_http_addr_conf_t, ngx_http_connection_t, ngx_http_core_srv_conf_t, ngx_int_t, ngx_log_t,
    ngx_ssl_connection_index, ngx_time_update, CRYPTO_get_ex_new_index,
    SSL_CTX_set_client_hello_cb, SSL_client_hello_get0_ext, SSL_get_ex_data, SSL_set_ex_data,
    CRYPTO_EX_INDEX_SSL, NGX_LOG_ALERT, NGX_LOG_EMERG, NGX_LOG_INFO, NGX_LOG_WARN, SSL,
    SSL_AD_INTERNAL_ERROR, SSL_CLIENT_HELLO_ERROR, SSL_CLIENT_HELLO_SUCCESS,
};
use ngx::core::Status;
use ngx::http::{HttpModuleMainConf, HttpModuleServerConf, NgxHttpCoreModule, NgxHttpSslModule};
use ngx::{ngx_log_debug, ngx_log_error};
use sni_guard_core::answer::Answer;
use sni_guard_core::cache::State;
use sni_guard_core::names::{self, Name};
use sni_guard_core::policy::{self, Step};

use crate::conf::{self, NoSni, SrvConf};
use crate::zone;

/// TLS extension number of server_name (RFC 6066).
const TLSEXT_SERVER_NAME: u32 = 0;

/// Index of the per-connection decision in OpenSSL's ex_data of an SSL object.
static DECISION_INDEX: OnceLock<c_int> = OnceLock::new();

/// The outcome for one connection, kept in the SSL object's ex_data so that a second
/// ClientHello on the same connection (after a HelloRetryRequest) gets the same answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Allow = 1,
    Refuse = 2,
}

/// Installs the callback; runs as the module's postconfiguration handler.
pub unsafe extern "C" fn install(cf: *mut ngx_conf_t) -> ngx_int_t {
    // SAFETY: nginx passes the configuration being loaded; the http core module's main
    // configuration holds every server of this http block.
    let Some(cmcf) = (unsafe { NgxHttpCoreModule::main_conf(&*cf) }) else {
        return Status::NGX_ERROR.into();
    };
    let servers = unsafe { cmcf.servers.as_slice::<*mut ngx_http_core_srv_conf_t>() };

    let guarded =
        servers.iter().filter_map(|&cscf| unsafe { conf::of_server(&*cscf) }).any(SrvConf::enabled);

    if !guarded {
        return Status::NGX_OK.into();
    }

    // nginx 1.29.2 and later select the server in a ClientHello callback of their own, which
    // this one would replace; the module does not chain to it yet.
    if cfg!(ngx_client_hello_cb) {
        ngx::ngx_conf_log_error!(
            NGX_LOG_EMERG,
            cf,
            "\"sni_guard\" does not support nginx 1.29.2 and later yet"
        );
        return Status::NGX_ERROR.into();
    }

    if decision_index().is_none() {
        ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "sni_guard: no SSL ex_data index available");
        return Status::NGX_ERROR.into();
    }

    for &cscf in servers {
        // SAFETY: every server has the SSL module's server configuration.
        let Some(sscf) = (unsafe { NgxHttpSslModule::server_conf(&*cscf) }) else {
            continue;
        };
        if sscf.ssl.ctx.is_null() {
            continue;
        }
        // SAFETY: the context belongs to this configuration and lives as long as it does.
        unsafe { SSL_CTX_set_client_hello_cb(sscf.ssl.ctx, Some(client_hello), ptr::null_mut()) };
    }

    Status::NGX_OK.into()
}

fn decision_index() -> Option<c_int> {
    let index = *DECISION_INDEX.get_or_init(|| {
        // SAFETY: a plain index registration with no callbacks; the stored values are small
        // integers, not pointers, so nothing needs freeing.
        unsafe {
            CRYPTO_get_ex_new_index(
                CRYPTO_EX_INDEX_SSL as c_int,
                0,
                ptr::null_mut(),
                None,
                None,
                None,
            )
        }
    });
    (index >= 0).then_some(index)
}

/// The ClientHello callback.
unsafe extern "C" fn client_hello(ssl: *mut SSL, alert: *mut c_int, _arg: *mut c_void) -> c_int {
    // SAFETY: nginx stores its connection in every SSL object it creates.
    let c = unsafe { SSL_get_ex_data(ssl, ngx_ssl_connection_index) }.cast::<ngx_connection_t>();
    let (Some(c), Some(index)) = (unsafe { c.as_mut() }, DECISION_INDEX.get().copied()) else {
        return SSL_CLIENT_HELLO_SUCCESS as c_int;
    };

    // SAFETY: the index was registered for SSL objects.
    let earlier = unsafe { SSL_get_ex_data(ssl, index) } as usize;

    let verdict = if earlier == Verdict::Allow as usize {
        Verdict::Allow
    } else if earlier == Verdict::Refuse as usize {
        Verdict::Refuse
    } else {
        let verdict = catch_unwind(AssertUnwindSafe(|| check(ssl, c))).unwrap_or_else(|_| {
            ngx_log_error!(NGX_LOG_ALERT, c.log, "sni_guard: panic in the handshake check");
            Verdict::Refuse
        });
        // SAFETY: as above; the value is an integer, not a pointer to free.
        unsafe { SSL_set_ex_data(ssl, index, verdict as usize as *mut c_void) };
        verdict
    };

    match verdict {
        Verdict::Allow => SSL_CLIENT_HELLO_SUCCESS as c_int,
        Verdict::Refuse => {
            // SAFETY: `c->ssl` is set for a connection in a handshake; marking the handshake as
            // rejected makes nginx log it at info level instead of as a failure.
            if let Some(ssl_conn) = unsafe { c.ssl.as_mut() } {
                ssl_conn.set_handshake_rejected(1);
            }
            // SAFETY: OpenSSL passes a valid alert pointer.
            unsafe { *alert = SSL_AD_INTERNAL_ERROR as c_int };
            SSL_CLIENT_HELLO_ERROR as c_int
        }
    }
}

/// Decides on one handshake.
fn check(ssl: *mut SSL, c: &ngx_connection_t) -> Verdict {
    // SAFETY: in an http connection's handshake, `c->data` is its ngx_http_connection_t and
    // `addr_conf` the configuration of the address it was accepted on.
    let Some(addr_conf) = (unsafe { c.data.cast::<ngx_http_connection_t>().as_ref() })
        .and_then(|hc| unsafe { hc.addr_conf.as_ref() })
    else {
        return Verdict::Allow;
    };

    let mut ext: *const u8 = ptr::null();
    let mut ext_len = 0usize;
    // SAFETY: OpenSSL fills in a pointer into the ClientHello it holds, valid for this call.
    let present =
        unsafe { SSL_client_hello_get0_ext(ssl, TLSEXT_SERVER_NAME, &mut ext, &mut ext_len) } == 1;

    if !present || ext.is_null() {
        let Some(conf) = server_conf(addr_conf.default_server) else {
            return Verdict::Allow;
        };
        return match conf.no_sni() {
            NoSni::Allow => Verdict::Allow,
            NoSni::Refuse => refuse(c.log, "", "no server name"),
        };
    }

    // SAFETY: `ext` points at `ext_len` bytes owned by OpenSSL for the duration of the call.
    let ext = unsafe { core::slice::from_raw_parts(ext, ext_len) };

    let raw = match names::parse_server_name_ext(ext) {
        Ok(raw) => raw,
        Err(e) => {
            // OpenSSL itself refuses such a ClientHello a moment later; a guarded default
            // server refuses it first, with the guard's alert.
            let Some(_) = server_conf(addr_conf.default_server) else {
                return Verdict::Allow;
            };
            return refuse(c.log, "", e.as_str());
        }
    };

    let Some(conf) = server_conf(select_server(addr_conf, raw)) else {
        return Verdict::Allow;
    };

    match names::normalise(raw) {
        Ok(name) => guard(conf, &name, c.log),
        Err(e) => refuse(c.log, &raw.escape_ascii().to_string(), e.as_str()),
    }
}

/// The settings of a server, when the guard is on there.
fn server_conf(cscf: *mut ngx_http_core_srv_conf_t) -> Option<&'static SrvConf> {
    // SAFETY: server configurations live as long as the cycle that handles the connection.
    let conf = conf::of_server(unsafe { cscf.as_ref()? })?;
    conf.enabled().then_some(conf)
}

/// The server nginx will select for a raw server name, found the way nginx finds it.
fn select_server(addr_conf: &ngx_http_addr_conf_t, raw: &[u8]) -> *mut ngx_http_core_srv_conf_t {
    let default = addr_conf.default_server;

    let (Some(key), Some(vn)) =
        (names::selection_key(raw), unsafe { addr_conf.virtual_names.as_mut() })
    else {
        return default;
    };

    let data = key.as_ptr().cast_mut();
    // SAFETY: nginx's hash functions only read `len` bytes of the key.
    let found = unsafe {
        ngx_hash_find_combined(&mut vn.names, ngx_hash_key(data, key.len()), data, key.len())
    };
    if !found.is_null() {
        return found.cast();
    }

    #[cfg(ngx_feature = "pcre2")]
    {
        // SAFETY: `regex` holds `nregex` entries compiled at configuration time.
        let regexes: &[nginx_sys::ngx_http_server_name_t] = if vn.regex.is_null() {
            &[]
        } else {
            unsafe { core::slice::from_raw_parts(vn.regex, vn.nregex) }
        };
        let mut name = nginx_sys::ngx_str_t { len: key.len(), data };
        for sn in regexes {
            // SAFETY: the compiled regex belongs to the configuration; no captures asked.
            let n = unsafe {
                nginx_sys::ngx_regex_exec((*sn.regex).regex, &mut name, ptr::null_mut(), 0)
            };
            if n >= 0 {
                return sn.server;
            }
            if n != nginx_sys::NGX_REGEX_NO_MATCHED as ngx_int_t {
                // nginx fails such a handshake itself; its default server decides meanwhile.
                break;
            }
        }
    }

    default
}

/// Applies the cache and the lookup service to a valid name.
fn guard(conf: &SrvConf, name: &Name, log: *mut ngx_log_t) -> Verdict {
    // SAFETY: a server with the guard on has a zone (checked at configuration time).
    let Some(zone) = (unsafe { conf.zone.as_ref() }) else {
        return refuse(log, name.as_str(), "no zone");
    };

    let now = current_msec();
    let step =
        zone::with_cache(zone, log, |cache| policy::consult(cache.get(name.as_bytes()), now))
            .unwrap_or(Step::Lookup);

    match step {
        Step::Cached(State::Registered) => {
            ngx_log_debug!(log, "sni_guard: \"{name}\" registered, from cache");
            Verdict::Allow
        }
        Step::Cached(State::NotRegistered) => refuse(log, name.as_str(), "not registered"),
        Step::Lookup => look_up(conf, zone, name, log),
    }
}

/// Asks the lookup service, caches the answer and decides by it.
fn look_up(
    conf: &SrvConf,
    zone: &nginx_sys::ngx_shm_zone_t,
    name: &Name,
    log: *mut ngx_log_t,
) -> Verdict {
    let Some(client) = conf.client.as_ref() else {
        return refuse(log, name.as_str(), "no lookup");
    };

    let result = client.check(name.as_str(), Duration::from_millis(conf.timeout as u64));

    // The worker was blocked for the lookup: bring nginx's clock up to date.
    // SAFETY: called on the worker's own thread, as the event loop does.
    unsafe { ngx_time_update() };
    let now = current_msec();

    let answer = match result {
        Ok(answer) => answer,
        Err(e) => {
            ngx_log_error!(
                NGX_LOG_WARN,
                log,
                "sni_guard lookup \"{}\" failed: {e}",
                client.url().request_url(name.as_str())
            );
            return refuse(log, name.as_str(), "lookup error");
        }
    };

    ngx_log_debug!(log, "sni_guard: lookup of \"{name}\": {answer:?}");

    if let Some((state, expires)) = policy::to_store(answer, &conf.times(), now) {
        let stored = zone::with_cache(zone, log, |cache| {
            cache.put(name.as_bytes(), state, expires, 0, now).is_ok()
        });
        if stored != Some(true) {
            zone_full(log, zone, now);
        }
    }

    match answer {
        Answer::Registered { .. } => Verdict::Allow,
        Answer::NotRegistered { .. } => refuse(log, name.as_str(), "not registered"),
    }
}

/// Logs that an answer could not be cached, at most once a minute per worker.
fn zone_full(log: *mut ngx_log_t, zone: &nginx_sys::ngx_shm_zone_t, now: u64) {
    static LAST: AtomicU64 = AtomicU64::new(0);

    let last = LAST.load(Ordering::Relaxed);
    if last != 0 && now.saturating_sub(last) < 60_000 {
        return;
    }
    LAST.store(now.max(1), Ordering::Relaxed);

    ngx_log_error!(
        NGX_LOG_WARN,
        log,
        "sni_guard zone \"{}\" is full, answers are not cached",
        String::from_utf8_lossy(zone.shm.name.as_bytes())
    );
}

fn refuse(log: *mut ngx_log_t, name: &str, reason: &str) -> Verdict {
    if name.is_empty() {
        ngx_log_error!(NGX_LOG_INFO, log, "sni_guard refused handshake: {reason}");
    } else {
        ngx_log_error!(NGX_LOG_INFO, log, "sni_guard refused \"{name}\": {reason}");
    }
    Verdict::Refuse
}

fn current_msec() -> u64 {
    // SAFETY: nginx's cached clock, updated on the worker's own thread.
    unsafe { ngx_current_msec as u64 }
}
