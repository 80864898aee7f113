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
use std::cell::RefCell;
use std::sync::OnceLock;

use nginx_sys::{
    ngx_conf_t, ngx_connection_t, ngx_hash_find_combined, ngx_hash_key, ngx_http_addr_conf_t,
    ngx_http_connection_t, ngx_http_core_srv_conf_t, ngx_int_t, ngx_log_t,
    ngx_ssl_connection_index, CRYPTO_get_ex_new_index, SSL_CTX_set_client_hello_cb,
    SSL_client_hello_get0_ext, SSL_get_ex_data, SSL_set_ex_data, CRYPTO_EX_INDEX_SSL,
    NGX_LOG_ALERT, NGX_LOG_EMERG, NGX_LOG_WARN, SSL, SSL_CLIENT_HELLO_ERROR,
    SSL_CLIENT_HELLO_SUCCESS,
};
use ngx::core::Status;
use ngx::http::{HttpModuleMainConf, HttpModuleServerConf, NgxHttpCoreModule, NgxHttpSslModule};
use ngx::ngx_log_error;
use sni_guard_core::cache::siphash13;
use sni_guard_core::names;
use sni_guard_core::panics;
use sni_guard_core::shared::{Allowance, Decision, LogLimit, Refusal, Stats};

use crate::conf::{self, Alert, NoSni, SrvConf};
use crate::{guard, lua, zone, Module};

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

    if decision_index().is_none() {
        ngx::ngx_conf_log_error!(NGX_LOG_EMERG, cf, "sni_guard: no SSL ex_data index available");
        return Status::NGX_ERROR.into();
    }

    // Lua's ClientHello handler, where configured, runs after the guard's check.
    // SAFETY: the http block's main configuration exists while it is being finished.
    let Some(main) = (unsafe { Module::main_conf_mut(&*cf) }) else {
        return Status::NGX_ERROR.into();
    };
    main.lua_handler = None;
    if !main.lua_client_hello.is_empty() {
        match lua::client_hello_handler() {
            Some(handler) => main.lua_handler = Some(handler),
            None => {
                ngx::ngx_conf_log_error!(
                    NGX_LOG_EMERG,
                    cf,
                    "\"sni_guard\" cannot run after \"ssl_client_hello_by_lua*\": \
                     lua-nginx-module's handler was not found"
                );
                return Status::NGX_ERROR.into();
            }
        }
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

/// The decision made on a connection's handshake, if the guard made one.
pub fn decision(ssl: *mut SSL) -> Option<Decision> {
    let index = DECISION_INDEX.get().copied()?;
    // SAFETY: the index was registered for SSL objects; the value holds a decision's code.
    Decision::from_code(unsafe { SSL_get_ex_data(ssl, index) } as usize & CODE_MASK)
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
/// The decision is kept in the SSL object's ex_data, with a fingerprint of the server_name
/// extension it was made for. A second ClientHello on the same connection (after a TLS 1.3
/// HelloRetryRequest) gets the first decision, with no second lookup and no second count - if
/// it names the same server. RFC 8446 (4.1.2) forbids the name to change, but OpenSSL does not
/// enforce it and nginx would select the server by the new name: a changed name is refused.
unsafe extern "C" fn client_hello(ssl: *mut SSL, alert: *mut c_int, arg: *mut c_void) -> c_int {
    // SAFETY: nginx stores its connection in every SSL object it creates.
    let c = unsafe { SSL_get_ex_data(ssl, ngx_ssl_connection_index) }.cast::<ngx_connection_t>();
    let (Some(c), Some(index)) = (unsafe { c.as_mut() }, DECISION_INDEX.get().copied()) else {
        return SSL_CLIENT_HELLO_SUCCESS as c_int;
    };

    // nginx 1.29.2 and later select the virtual server in a ClientHello callback of their own,
    // which this one replaced on the SSL_CTX: it runs first, and its refusals stand.
    #[cfg(ngx_client_hello_cb)]
    {
        // SAFETY: nginx's callback reads its own argument from the SSL_CTX's ex_data.
        let rc = unsafe { nginx_sys::ngx_ssl_client_hello_callback(ssl, alert, arg) };
        if rc != SSL_CLIENT_HELLO_SUCCESS as c_int {
            return rc;
        }
    }

    let fingerprint = fingerprint(server_name_ext(ssl));
    // SAFETY: the index was registered for SSL objects.
    let earlier = unsafe { SSL_get_ex_data(ssl, index) } as usize;

    let decision = if earlier != 0 {
        if earlier & !CODE_MASK == fingerprint {
            // A second ClientHello follows only an allowed first one (a refusal ends the
            // handshake), so the alert is never sent for an earlier decision.
            Decision::from_code(earlier & CODE_MASK).map(|d| (d, Alert::InternalError))
        } else {
            Some(name_changed(ssl, c))
        }
    } else {
        let decided = panics::catch(|| check(ssl, c)).unwrap_or_else(|panic| {
            ngx_log_error!(
                NGX_LOG_ALERT,
                c.log,
                "sni_guard: panic in the handshake check: {panic}"
            );
            Some((Decision::Refuse(Refusal::LookupError), None))
        });

        if let Some((decision, conf)) = decided {
            if let Some(stats) = conf.and_then(stats) {
                match decision {
                    Decision::Allow(how) => stats.allowed(how),
                    Decision::Refuse(why) => stats.refused(why),
                }
            }
        }

        let code = decided.map_or(NOT_GUARDED, |(decision, _)| decision.code());
        // SAFETY: as above; the value is an integer, not a pointer to free.
        unsafe { SSL_set_ex_data(ssl, index, (fingerprint | code) as *mut c_void) };

        decided
            .map(|(decision, conf)| (decision, conf.map_or(Alert::InternalError, SrvConf::alert)))
    };

    match decision {
        None | Some((Decision::Allow(_), _)) => match lua_handler(c) {
            // SAFETY: Lua's handler gets what OpenSSL gave this callback.
            Some(lua) => unsafe { lua(ssl, alert, arg) },
            None => SSL_CLIENT_HELLO_SUCCESS as c_int,
        },
        Some((Decision::Refuse(_), how)) => {
            // SAFETY: `c->ssl` is set for a connection in a handshake; marking the handshake as
            // rejected makes nginx log it at info level instead of as a failure.
            if let Some(ssl_conn) = unsafe { c.ssl.as_mut() } {
                ssl_conn.set_handshake_rejected(1);
            }
            // SAFETY: OpenSSL passes a valid alert pointer.
            unsafe { *alert = how as c_int };
            SSL_CLIENT_HELLO_ERROR as c_int
        }
    }
}

/// Lua's ClientHello handler, when it would have run for this connection: when the default
/// server of its address configured `ssl_client_hello_by_lua*`.
fn lua_handler(c: &ngx_connection_t) -> Option<lua::ClientHelloFn> {
    // SAFETY: as in `check`.
    let default = unsafe {
        let hc = c.data.cast::<ngx_http_connection_t>().as_ref()?;
        hc.addr_conf.as_ref()?.default_server.as_ref()?
    };
    let main = Module::main_conf(default)?;
    let handler = main.lua_handler?;
    // SAFETY: a server's context is set when it is configured.
    let srv_conf = unsafe { default.ctx.as_ref()? }.srv_conf;
    main.lua_client_hello.runs_for(srv_conf).then_some(handler)
}

/// The low bits of the value kept per connection hold the decision's code, the rest the
/// fingerprint of the server name it was made for.
const CODE_MASK: usize = 0xff;

/// The code kept for a handshake the guard let through because it is off for that server.
const NOT_GUARDED: usize = 0xff;

/// The server_name extension of the ClientHello being handled, if it has one.
fn server_name_ext<'a>(ssl: *mut SSL) -> Option<&'a [u8]> {
    let mut ext: *const u8 = ptr::null();
    let mut len = 0usize;
    // SAFETY: OpenSSL fills in a pointer into the ClientHello it holds, valid for the callback.
    let present =
        unsafe { SSL_client_hello_get0_ext(ssl, TLSEXT_SERVER_NAME, &mut ext, &mut len) } == 1;
    if !present || ext.is_null() {
        return None;
    }
    // SAFETY: `ext` points at `len` bytes, as above.
    Some(unsafe { core::slice::from_raw_parts(ext, len) })
}

/// A fingerprint of a server_name extension (or of its absence), in the bits above `CODE_MASK`.
fn fingerprint(ext: Option<&[u8]>) -> usize {
    let hash = match ext {
        Some(ext) => siphash13([0x736e_6967_7561_7264, 1], ext),
        None => siphash13([0x736e_6967_7561_7264, 2], b""),
    };
    (hash as usize) & !CODE_MASK
}

/// Refuses a second ClientHello that names another server than the first, with the settings
/// of the address's default server.
fn name_changed(ssl: *mut SSL, c: &ngx_connection_t) -> (Decision, Alert) {
    let name = server_name_ext(ssl)
        .and_then(|ext| names::parse_server_name_ext(ext).ok())
        .map(printable)
        .unwrap_or_default();
    let reason = "server name changed after a retry";
    let decision = Decision::Refuse(Refusal::InvalidName);

    // SAFETY: as in `check`.
    let default = unsafe { c.data.cast::<ngx_http_connection_t>().as_ref() }
        .and_then(|hc| unsafe { hc.addr_conf.as_ref() })
        .and_then(|addr_conf| unsafe { addr_conf.default_server.as_ref() })
        .and_then(conf::of_server);

    match default {
        Some(conf) => {
            log_refusal(conf, c.log, &name, reason);
            if let Some(stats) = stats(conf) {
                stats.refused(Refusal::InvalidName);
            }
            (decision, conf.alert())
        }
        None => {
            ngx_log_error!(
                nginx_sys::NGX_LOG_INFO,
                c.log,
                "sni_guard refused \"{name}\": {reason}"
            );
            (decision, Alert::InternalError)
        }
    }
}

/// Decides on one handshake: `None` where the guard is off, else the decision and the counters
/// of the zone it was made with.
fn check(ssl: *mut SSL, c: &ngx_connection_t) -> Option<(Decision, Option<&'static SrvConf>)> {
    // SAFETY: in an http connection's handshake, `c->data` is its ngx_http_connection_t and
    // `addr_conf` the configuration of the address it was accepted on.
    let addr_conf = unsafe { c.data.cast::<ngx_http_connection_t>().as_ref() }
        .and_then(|hc| unsafe { hc.addr_conf.as_ref() })?;

    let Some(ext) = server_name_ext(ssl) else {
        let conf = server_conf(addr_conf.default_server)?;
        let decision = match conf.no_sni() {
            NoSni::Allow => Decision::Allow(Allowance::NoSni),
            NoSni::Refuse => {
                log_refusal(conf, c.log, "", "no server name");
                Decision::Refuse(Refusal::NoSni)
            }
        };
        return Some((decision, Some(conf)));
    };

    let raw = match names::parse_server_name_ext(ext) {
        Ok(raw) => raw,
        Err(e) => {
            // OpenSSL itself refuses such a ClientHello a moment later; a guarded default
            // server refuses it first, with the guard's alert.
            let conf = server_conf(addr_conf.default_server)?;
            log_refusal(conf, c.log, "", e.as_str());
            return Some((Decision::Refuse(Refusal::InvalidName), Some(conf)));
        }
    };

    let conf = server_conf(selected_server(c, addr_conf, raw))?;

    let decision = match names::normalise(raw) {
        Ok(name) => guard::decide(conf, &name, c),
        Err(e) => {
            log_refusal(conf, c.log, &printable(raw), e.as_str());
            Decision::Refuse(Refusal::InvalidName)
        }
    };

    Some((decision, Some(conf)))
}

fn stats(conf: &SrvConf) -> Option<&'static Stats> {
    // SAFETY: the zone lives as long as the configuration.
    zone::stats(unsafe { conf.zone.as_ref()? })
}

/// A raw name for a log line: escaped, and cut short so that nginx's line limit keeps the
/// reason and the client address.
fn printable(raw: &[u8]) -> String {
    const MAX: usize = 300;
    let mut text: String = raw.escape_ascii().to_string();
    if text.len() > MAX {
        text.truncate(MAX);
        text.push_str("...");
    }
    text
}

/// The settings of a server, when the guard is on there.
fn server_conf(cscf: *mut ngx_http_core_srv_conf_t) -> Option<&'static SrvConf> {
    // SAFETY: server configurations live as long as the cycle that handles the connection.
    let conf = conf::of_server(unsafe { cscf.as_ref()? })?;
    conf.enabled().then_some(conf)
}

/// The server nginx selected, or will select, for the handshake's server name.
#[cfg(not(ngx_client_hello_cb))]
fn selected_server(
    c: &ngx_connection_t,
    addr_conf: &ngx_http_addr_conf_t,
    raw: &[u8],
) -> *mut ngx_http_core_srv_conf_t {
    select_server(addr_conf, raw, c.log)
}

/// nginx's own callback has selected the server by now and switched the connection to it.
#[cfg(ngx_client_hello_cb)]
fn selected_server(
    c: &ngx_connection_t,
    addr_conf: &ngx_http_addr_conf_t,
    _raw: &[u8],
) -> *mut ngx_http_core_srv_conf_t {
    // SAFETY: as in `check`; `conf_ctx` is the selected server's context.
    unsafe { c.data.cast::<ngx_http_connection_t>().as_ref() }
        .and_then(NgxHttpCoreModule::server_conf)
        .map_or(addr_conf.default_server, |cscf| ptr::from_ref(cscf).cast_mut())
}

/// The server nginx will select for a raw server name, found the way nginx finds it.
#[cfg_attr(ngx_client_hello_cb, allow(dead_code))]
fn select_server(
    addr_conf: &ngx_http_addr_conf_t,
    raw: &[u8],
    log: *mut ngx_log_t,
) -> *mut ngx_http_core_srv_conf_t {
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

    #[cfg(ngx_feature = "pcre")]
    {
        // SAFETY: `regex` holds `nregex` entries compiled at configuration time.
        let regexes: &[nginx_sys::ngx_http_server_name_t] = if vn.regex.is_null() {
            &[]
        } else {
            unsafe { core::slice::from_raw_parts(vn.regex, vn.nregex) }
        };
        let mut name = nginx_sys::ngx_str_t { len: key.len(), data };
        for sn in regexes {
            // ngx_regex_exec_array() is the one matcher nginx exports for both PCRE and PCRE2;
            // it is given a one-entry array so that the server that matched is known.
            // SAFETY: the compiled regex belongs to the configuration; the array outlives the
            // call, which only reads it.
            let mut elt = nginx_sys::ngx_regex_elt_t {
                regex: unsafe { (*sn.regex).regex },
                name: sn.name.data,
            };
            let mut one = nginx_sys::ngx_array_t {
                elts: ptr::from_mut(&mut elt).cast(),
                nelts: 1,
                size: core::mem::size_of::<nginx_sys::ngx_regex_elt_t>(),
                nalloc: 1,
                pool: ptr::null_mut(),
            };
            match unsafe { nginx_sys::ngx_regex_exec_array(&mut one, &mut name, log) } {
                rc if rc == nginx_sys::NGX_OK as ngx_int_t => return sn.server,
                rc if rc == nginx_sys::NGX_DECLINED as ngx_int_t => {}
                // nginx fails such a handshake itself; its default server decides meanwhile.
                _ => break,
            }
        }
    }

    default
}

/// Logs a refusal at the server's `sni_guard_log_level`. Under attack there is one refusal per
/// handshake, so at warn and above at most ten lines a second per worker are written, and the
/// rest are counted in the next one.
pub fn log_refusal(conf: &SrvConf, log: *mut ngx_log_t, name: &str, reason: &str) {
    thread_local! {
        static LINES: RefCell<LogLimit> = RefCell::new(LogLimit::default());
    }

    let level = conf.log_level();
    let mut held = 0;
    if level <= NGX_LOG_WARN as nginx_sys::ngx_uint_t {
        match LINES.with(|l| l.borrow_mut().admit(guard::current_msec(), 1000, 10)) {
            Some(n) => held = n,
            None => return,
        }
    }
    let held = if held == 0 { String::new() } else { format!(" ({held} more not logged)") };

    if name.is_empty() {
        ngx_log_error!(level, log, "sni_guard refused handshake: {reason}{held}");
    } else {
        ngx_log_error!(level, log, "sni_guard refused \"{name}\": {reason}{held}");
    }
}
