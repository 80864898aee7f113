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
use std::sync::OnceLock;

use nginx_sys::{
    ngx_conf_t, ngx_connection_t, ngx_hash_find_combined, ngx_hash_key, ngx_http_addr_conf_t,
    ngx_http_connection_t, ngx_http_core_srv_conf_t, ngx_int_t, ngx_log_t,
    ngx_ssl_connection_index, CRYPTO_get_ex_new_index, SSL_CTX_set_client_hello_cb,
    SSL_client_hello_get0_ext, SSL_get_ex_data, SSL_set_ex_data, CRYPTO_EX_INDEX_SSL,
    NGX_LOG_ALERT, NGX_LOG_EMERG, NGX_LOG_INFO, SSL, SSL_AD_INTERNAL_ERROR, SSL_CLIENT_HELLO_ERROR,
    SSL_CLIENT_HELLO_SUCCESS,
};
use ngx::core::Status;
use ngx::http::{HttpModuleMainConf, HttpModuleServerConf, NgxHttpCoreModule, NgxHttpSslModule};
use ngx::ngx_log_error;
use sni_guard_core::names;
use sni_guard_core::shared::{Allowance, Decision, Refusal, Stats};

use crate::conf::{self, NoSni, SrvConf};
use crate::{guard, zone};

/// TLS extension number of server_name (RFC 6066).
const TLSEXT_SERVER_NAME: u32 = 0;

/// Index of the per-connection decision in OpenSSL's ex_data of an SSL object.
static DECISION_INDEX: OnceLock<c_int> = OnceLock::new();

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
///
/// The decision is kept in the SSL object's ex_data: a second ClientHello on the same connection
/// (after a HelloRetryRequest) gets the first decision, with no second lookup and no second
/// count.
unsafe extern "C" fn client_hello(ssl: *mut SSL, alert: *mut c_int, _arg: *mut c_void) -> c_int {
    // SAFETY: nginx stores its connection in every SSL object it creates.
    let c = unsafe { SSL_get_ex_data(ssl, ngx_ssl_connection_index) }.cast::<ngx_connection_t>();
    let (Some(c), Some(index)) = (unsafe { c.as_mut() }, DECISION_INDEX.get().copied()) else {
        return SSL_CLIENT_HELLO_SUCCESS as c_int;
    };

    // SAFETY: the index was registered for SSL objects.
    let earlier = Decision::from_code(unsafe { SSL_get_ex_data(ssl, index) } as usize);

    let decision = match earlier {
        Some(decision) => Some(decision),
        None => {
            let decided = catch_unwind(AssertUnwindSafe(|| check(ssl, c))).unwrap_or_else(|_| {
                ngx_log_error!(NGX_LOG_ALERT, c.log, "sni_guard: panic in the handshake check");
                Some((Decision::Refuse(Refusal::LookupError), None))
            });
            decided.map(|(decision, stats)| {
                if let Some(stats) = stats {
                    match decision {
                        Decision::Allow(how) => stats.allowed(how),
                        Decision::Refuse(why) => stats.refused(why),
                    }
                }
                // SAFETY: as above; the value is a small integer, not a pointer to free.
                unsafe { SSL_set_ex_data(ssl, index, decision.code() as *mut c_void) };
                decision
            })
        }
    };

    match decision {
        None | Some(Decision::Allow(_)) => SSL_CLIENT_HELLO_SUCCESS as c_int,
        Some(Decision::Refuse(_)) => {
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

/// Decides on one handshake: `None` where the guard is off, else the decision and the counters
/// of the zone it was made with.
fn check(ssl: *mut SSL, c: &ngx_connection_t) -> Option<(Decision, Option<&'static Stats>)> {
    // SAFETY: in an http connection's handshake, `c->data` is its ngx_http_connection_t and
    // `addr_conf` the configuration of the address it was accepted on.
    let addr_conf = unsafe { c.data.cast::<ngx_http_connection_t>().as_ref() }
        .and_then(|hc| unsafe { hc.addr_conf.as_ref() })?;

    let mut ext: *const u8 = ptr::null();
    let mut ext_len = 0usize;
    // SAFETY: OpenSSL fills in a pointer into the ClientHello it holds, valid for this call.
    let present =
        unsafe { SSL_client_hello_get0_ext(ssl, TLSEXT_SERVER_NAME, &mut ext, &mut ext_len) } == 1;

    if !present || ext.is_null() {
        let conf = server_conf(addr_conf.default_server)?;
        let decision = match conf.no_sni() {
            NoSni::Allow => Decision::Allow(Allowance::NoSni),
            NoSni::Refuse => {
                log_refusal(c.log, "", "no server name");
                Decision::Refuse(Refusal::NoSni)
            }
        };
        return Some((decision, stats(conf)));
    }

    // SAFETY: `ext` points at `ext_len` bytes owned by OpenSSL for the duration of the call.
    let ext = unsafe { core::slice::from_raw_parts(ext, ext_len) };

    let raw = match names::parse_server_name_ext(ext) {
        Ok(raw) => raw,
        Err(e) => {
            // OpenSSL itself refuses such a ClientHello a moment later; a guarded default
            // server refuses it first, with the guard's alert.
            let conf = server_conf(addr_conf.default_server)?;
            log_refusal(c.log, "", e.as_str());
            return Some((Decision::Refuse(Refusal::InvalidName), stats(conf)));
        }
    };

    let conf = server_conf(select_server(addr_conf, raw))?;

    let decision = match names::normalise(raw) {
        Ok(name) => guard::decide(conf, &name, c),
        Err(e) => {
            log_refusal(c.log, &raw.escape_ascii().to_string(), e.as_str());
            Decision::Refuse(Refusal::InvalidName)
        }
    };

    Some((decision, stats(conf)))
}

fn stats(conf: &SrvConf) -> Option<&'static Stats> {
    // SAFETY: the zone lives as long as the configuration.
    zone::stats(unsafe { conf.zone.as_ref()? })
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

/// Logs a refusal, at info level: under attack there is one per handshake.
pub fn log_refusal(log: *mut ngx_log_t, name: &str, reason: &str) {
    if name.is_empty() {
        ngx_log_error!(NGX_LOG_INFO, log, "sni_guard refused handshake: {reason}");
    } else {
        ngx_log_error!(NGX_LOG_INFO, log, "sni_guard refused \"{name}\": {reason}");
    }
}
