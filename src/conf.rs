//! Directives and the per-server configuration.

use core::ffi::{c_char, c_void};
use core::mem::offset_of;
use core::ptr;
use std::sync::Arc;

use nginx_sys::{
    ngx_command_t, ngx_conf_enum_t, ngx_conf_full_name, ngx_conf_set_flag_slot,
    ngx_conf_set_msec_slot, ngx_conf_set_str_slot, ngx_conf_t, ngx_flag_t,
    ngx_http_core_srv_conf_t, ngx_msec_t, ngx_parse_size, ngx_parse_time, ngx_shared_memory_add,
    ngx_shm_zone_t, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_FLAG, NGX_CONF_NOARGS,
    NGX_CONF_TAKE1, NGX_CONF_TAKE12, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET,
    NGX_HTTP_MAIN_CONF, NGX_HTTP_SRV_CONF, NGX_HTTP_SRV_CONF_OFFSET, NGX_LOG_EMERG, NGX_LOG_ERR,
    NGX_LOG_INFO, NGX_LOG_NOTICE, NGX_LOG_WARN,
};
use ngx::core::{Pool, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::http::{
    HttpModuleLocationConf, HttpModuleMainConf, HttpModuleServerConf, NgxHttpCoreModule,
};
use ngx::{ngx_conf_log_error, ngx_log_error, ngx_string};
use sni_guard_core::allow::AllowList;
use sni_guard_core::lookup::{Client, ClientOptions, LookupUrl};
use sni_guard_core::policy::Times;
use sni_guard_core::shared::{BreakerSettings, Rate};

use crate::zone::{self, ZoneCtx};
use crate::Module;

const NGX_CONF_UNSET: ngx_flag_t = -1;
const NGX_CONF_UNSET_MSEC: ngx_msec_t = ngx_msec_t::MAX;
const NGX_CONF_UNSET_UINT: ngx_uint_t = ngx_uint_t::MAX;

/// Least time between two refreshes of one name.
const REFRESH_INTERVAL: ngx_msec_t = 10_000;

/// Longest `sni_guard_timeout`: a lookup on a miss blocks the worker for up to that long.
const MAX_TIMEOUT: ngx_msec_t = 10_000;

/// Longest `sni_guard_stale`: answers keep it in 32 bits of milliseconds.
const MAX_STALE: ngx_msec_t = 49 * 24 * 3600 * 1000;

/// Reply bodies longer than this are a lookup error.
const MAX_REPLY_BODY: usize = 16 * 1024;

/// Largest CA file read: a bundle of every public root is some 200 KB; more is not a CA file
/// (and a device such as /dev/zero never ends).
const MAX_CA_FILE: u64 = 4 * 1024 * 1024;

/// Default of `sni_guard_breaker`: consecutive errors, and the cool-down in milliseconds.
const DEFAULT_BREAKER: (u32, u64) = (5, 10_000);

/// What to do with a handshake whose name could not be looked up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    Refuse = 0,
    Allow = 1,
}

/// The alert a refusal sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alert {
    InternalError = 80,
    UnrecognizedName = 112,
}

/// What every server of the http block shares: the zones, for the status page and the purge,
/// and where Lua's ClientHello handler runs.
#[derive(Default)]
pub struct MainConf {
    pub zones: Vec<*mut ngx_shm_zone_t>,
    pub lua_client_hello: crate::lua::LuaClientHello,
    /// Lua's handler, found when a server configures it.
    pub lua_handler: Option<crate::lua::ClientHelloFn>,
}

/// Configuration of a location: which of the module's handlers it has, and what
/// `sni_guard_purge` purges.
#[derive(Default)]
pub struct LocConf {
    /// `sni_guard_status` or `sni_guard_purge`, and where it was written.
    pub handler: Option<(&'static str, String)>,
    /// The zone to purge; empty for every zone.
    pub purge_zone: ngx_str_t,
}

type ContentHandler =
    unsafe extern "C" fn(*mut nginx_sys::ngx_http_request_t) -> nginx_sys::ngx_int_t;

/// What to do with a handshake that carries no server name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSni {
    Allow = 0,
    Refuse = 1,
}

/// Configuration of one `server {}` block (and of the `http {}` level it inherits from).
pub struct SrvConf {
    pub enable: ngx_flag_t,
    pub timeout: ngx_msec_t,
    pub valid: ngx_msec_t,
    pub invalid: ngx_msec_t,
    pub no_sni: ngx_uint_t,
    pub stale: ngx_msec_t,
    pub on_error: ngx_uint_t,
    pub alert: ngx_uint_t,
    pub log_level: ngx_uint_t,
    pub zone: *mut ngx_shm_zone_t,

    /// `sni_guard_allow`: names that pass without a lookup.
    pub allow: Option<AllowList>,

    /// `sni_guard_lookup_rate`: the zone's budget and a client's share of it; `Some(None, _)`
    /// for `off`.
    pub rate: Option<(Option<Rate>, Option<Rate>)>,
    /// `sni_guard_breaker`; `errors` is 0 for `off`.
    pub breaker: Option<BreakerSettings>,
    /// `sni_guard_thread_pool`, and the pool it names once the guard is on.
    pub thread_pool_name: ngx_str_t,
    pub thread_pool: *mut nginx_sys::ngx_thread_pool_t,

    /// `sni_guard_lookup`, with the addresses its host resolved to at configuration time.
    pub lookup: Option<(LookupUrl, Vec<std::net::SocketAddr>)>,
    pub trusted_certificate: ngx_str_t,
    /// The client for `lookup`, shared by every server that inherits the same settings.
    pub client: Option<Arc<Client>>,
}

impl Default for SrvConf {
    fn default() -> Self {
        SrvConf {
            enable: NGX_CONF_UNSET,
            timeout: NGX_CONF_UNSET_MSEC,
            valid: NGX_CONF_UNSET_MSEC,
            invalid: NGX_CONF_UNSET_MSEC,
            no_sni: NGX_CONF_UNSET_UINT,
            stale: NGX_CONF_UNSET_MSEC,
            on_error: NGX_CONF_UNSET_UINT,
            alert: NGX_CONF_UNSET_UINT,
            log_level: NGX_CONF_UNSET_UINT,
            zone: ptr::null_mut(),
            allow: None,
            rate: None,
            breaker: None,
            thread_pool_name: ngx_str_t::empty(),
            thread_pool: ptr::null_mut(),
            lookup: None,
            trusted_certificate: ngx_str_t::empty(),
            client: None,
        }
    }
}

impl SrvConf {
    pub fn enabled(&self) -> bool {
        self.enable == 1
    }

    pub fn times(&self) -> Times {
        Times {
            valid: self.valid as u64,
            invalid: self.invalid as u64,
            stale: self.stale.min(u32::MAX as ngx_msec_t) as u32,
            // A refresh may wait in the thread pool's queue before it runs: a name is not
            // refreshed again for this long, nor retried sooner after a failed refresh.
            refresh_busy: (4 * self.timeout).clamp(REFRESH_INTERVAL, u32::MAX as ngx_msec_t) as u32,
        }
    }

    /// The zone's lookup budget and a client's share of it.
    pub fn rate(&self) -> (Option<Rate>, Option<Rate>) {
        self.rate.unwrap_or((None, None))
    }

    /// The zone's breaker settings; the probe timeout is this server's: a probe that takes
    /// longer than a lookup can is lost, and another may go.
    pub fn breaker(&self) -> BreakerSettings {
        let settings =
            self.breaker.unwrap_or(BreakerSettings { errors: 0, cooldown: 0, probe_timeout: 0 });
        BreakerSettings { probe_timeout: self.timeout as u64 + 1000, ..settings }
    }

    pub fn alert(&self) -> Alert {
        if self.alert == Alert::UnrecognizedName as ngx_uint_t {
            Alert::UnrecognizedName
        } else {
            Alert::InternalError
        }
    }

    pub fn log_level(&self) -> ngx_uint_t {
        self.log_level
    }

    pub fn allows(&self, name: &sni_guard_core::names::Name) -> bool {
        self.allow.as_ref().is_some_and(|list| list.matches(name))
    }

    pub fn on_error(&self) -> OnError {
        if self.on_error == OnError::Allow as ngx_uint_t {
            OnError::Allow
        } else {
            OnError::Refuse
        }
    }

    pub fn no_sni(&self) -> NoSni {
        if self.no_sni == NoSni::Refuse as ngx_uint_t {
            NoSni::Refuse
        } else {
            NoSni::Allow
        }
    }
}

static mut NO_SNI_VALUES: [ngx_conf_enum_t; 3] = [
    ngx_conf_enum_t { name: ngx_string!("allow"), value: NoSni::Allow as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_string!("refuse"), value: NoSni::Refuse as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_str_t::empty(), value: 0 },
];

static mut ON_ERROR_VALUES: [ngx_conf_enum_t; 3] = [
    ngx_conf_enum_t { name: ngx_string!("refuse"), value: OnError::Refuse as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_string!("allow"), value: OnError::Allow as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_str_t::empty(), value: 0 },
];

static mut ALERT_VALUES: [ngx_conf_enum_t; 3] = [
    ngx_conf_enum_t {
        name: ngx_string!("internal_error"),
        value: Alert::InternalError as ngx_uint_t,
    },
    ngx_conf_enum_t {
        name: ngx_string!("unrecognized_name"),
        value: Alert::UnrecognizedName as ngx_uint_t,
    },
    ngx_conf_enum_t { name: ngx_str_t::empty(), value: 0 },
];

static mut LOG_LEVELS: [ngx_conf_enum_t; 5] = [
    ngx_conf_enum_t { name: ngx_string!("info"), value: NGX_LOG_INFO as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_string!("notice"), value: NGX_LOG_NOTICE as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_string!("warn"), value: NGX_LOG_WARN as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_string!("error"), value: NGX_LOG_ERR as ngx_uint_t },
    ngx_conf_enum_t { name: ngx_str_t::empty(), value: 0 },
];

const HTTP_SRV: ngx_uint_t = (NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF) as ngx_uint_t;

pub static mut COMMANDS: [ngx_command_t; 19] = [
    ngx_command_t {
        name: ngx_string!("sni_guard"),
        type_: HTTP_SRV | NGX_CONF_FLAG as ngx_uint_t,
        set: Some(ngx_conf_set_flag_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, enable),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_lookup"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_lookup),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_lookup_trusted_certificate"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_file),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, trusted_certificate),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_zone"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_zone),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_timeout"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_timeout),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, timeout),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_valid"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_conf_set_msec_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, valid),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_invalid"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(ngx_conf_set_msec_slot),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, invalid),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_no_sni"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_enum),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, no_sni),
        post: ptr::addr_of_mut!(NO_SNI_VALUES) as *mut c_void,
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_stale"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_stale),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, stale),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_lookup_rate"),
        type_: HTTP_SRV | NGX_CONF_1MORE as ngx_uint_t,
        set: Some(cmd_set_rate),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_breaker"),
        type_: HTTP_SRV | NGX_CONF_TAKE12 as ngx_uint_t,
        set: Some(cmd_set_breaker),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_on_error"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_enum),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, on_error),
        post: ptr::addr_of_mut!(ON_ERROR_VALUES) as *mut c_void,
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_thread_pool"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_thread_pool),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, thread_pool_name),
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_allow"),
        type_: HTTP_SRV | NGX_CONF_1MORE as ngx_uint_t,
        set: Some(cmd_set_allow),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_alert"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_enum),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, alert),
        post: ptr::addr_of_mut!(ALERT_VALUES) as *mut c_void,
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_log_level"),
        type_: HTTP_SRV | NGX_CONF_TAKE1 as ngx_uint_t,
        set: Some(cmd_set_enum),
        conf: NGX_HTTP_SRV_CONF_OFFSET,
        offset: offset_of!(SrvConf, log_level),
        post: ptr::addr_of_mut!(LOG_LEVELS) as *mut c_void,
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_status"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS) as ngx_uint_t,
        set: Some(cmd_set_status),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t {
        name: ngx_string!("sni_guard_purge"),
        type_: (NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS | NGX_CONF_TAKE1) as ngx_uint_t,
        set: Some(cmd_set_purge),
        conf: NGX_HTTP_LOC_CONF_OFFSET,
        offset: 0,
        post: ptr::null_mut(),
    },
    ngx_command_t::empty(),
];

pub unsafe extern "C" fn create_main_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as in `create_srv_conf`.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(MainConf::default()).cast()
}

pub unsafe extern "C" fn create_loc_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: as in `create_srv_conf`.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(LocConf::default()).cast()
}

/// Checks that the location's handler is still the module's (a later `proxy_pass` and the
/// like replace it silently), and that a purged zone exists, once every zone of the http block
/// is known.
pub unsafe extern "C" fn merge_loc_conf(
    cf: *mut ngx_conf_t,
    _parent: *mut c_void,
    child: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the configuration `create_loc_conf` made.
    let conf = unsafe { &*child.cast::<LocConf>() };
    let Some((directive, position)) = &conf.handler else {
        return NGX_CONF_OK;
    };

    // SAFETY: while locations are merged, `cf->ctx` holds the location's configurations.
    let Some(clcf) = (unsafe { NgxHttpCoreModule::location_conf(&*cf) }) else {
        return NGX_CONF_ERROR;
    };
    let ours: [ContentHandler; 2] = [crate::status::status_handler, crate::status::purge_handler];
    if !clcf.handler.is_some_and(|h| ours.iter().any(|&o| core::ptr::fn_addr_eq(h, o))) {
        ngx_log_error!(
            NGX_LOG_EMERG,
            unsafe { (*cf).log },
            "\"{directive}\" cannot be used with another content handler in one location in \
             {position}"
        );
        return NGX_CONF_ERROR;
    }

    if conf.purge_zone.is_empty() {
        return NGX_CONF_OK;
    }

    // SAFETY: the http block's main configuration is complete while locations are merged.
    let Some(main) = (unsafe { Module::main_conf(&*cf) }) else {
        return NGX_CONF_ERROR;
    };
    // SAFETY: the zones were added by `cmd_set_zone` for this configuration.
    let known = main.zones.iter().any(|&z| unsafe { (*z).shm.name == conf.purge_zone });
    if !known {
        ngx_log_error!(
            NGX_LOG_EMERG,
            unsafe { (*cf).log },
            "unknown sni_guard_zone \"{}\" in \"sni_guard_purge\" in {position}",
            conf.purge_zone
        );
        return NGX_CONF_ERROR;
    }
    NGX_CONF_OK
}

pub unsafe extern "C" fn create_srv_conf(cf: *mut ngx_conf_t) -> *mut c_void {
    // SAFETY: nginx passes a valid configuration context; the pool outlives the configuration
    // and drops the value when it is destroyed.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    pool.allocate(SrvConf::default()).cast()
}

pub unsafe extern "C" fn merge_srv_conf(
    cf: *mut ngx_conf_t,
    parent: *mut c_void,
    child: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the configurations `create_srv_conf` made, one level apart.
    let (prev, conf) = unsafe { (&mut *parent.cast::<SrvConf>(), &mut *child.cast::<SrvConf>()) };

    merge(conf, prev);

    if !conf.enabled() {
        return NGX_CONF_OK;
    }

    // SAFETY: during merging, `cf->ctx` is the context of the server being merged.
    let Some(cscf) = (unsafe { NgxHttpCoreModule::server_conf(&*cf) }) else {
        return NGX_CONF_ERROR;
    };

    match finish(cf, conf, prev) {
        Ok(()) => NGX_CONF_OK,
        Err(what) => {
            // The parse position is the end of the http block by now: name the server instead.
            // SAFETY: `cf->log` is the configuration log while nginx merges.
            ngx_log_error!(
                NGX_LOG_EMERG,
                unsafe { (*cf).log },
                "{what} for \"sni_guard\" in {}:{}",
                file_name(cscf),
                cscf.line
            );
            NGX_CONF_ERROR
        }
    }
}

fn merge(conf: &mut SrvConf, prev: &SrvConf) {
    fn value<T: Copy + PartialEq>(v: &mut T, prev: T, unset: T, default: T) {
        if *v == unset {
            *v = if prev == unset { default } else { prev };
        }
    }

    value(&mut conf.enable, prev.enable, NGX_CONF_UNSET, 0);
    value(&mut conf.timeout, prev.timeout, NGX_CONF_UNSET_MSEC, 500);
    value(&mut conf.valid, prev.valid, NGX_CONF_UNSET_MSEC, 10 * 60 * 1000);
    value(&mut conf.invalid, prev.invalid, NGX_CONF_UNSET_MSEC, 60 * 1000);
    value(&mut conf.no_sni, prev.no_sni, NGX_CONF_UNSET_UINT, NoSni::Allow as ngx_uint_t);
    value(&mut conf.stale, prev.stale, NGX_CONF_UNSET_MSEC, 60 * 60 * 1000);
    value(&mut conf.on_error, prev.on_error, NGX_CONF_UNSET_UINT, OnError::Refuse as ngx_uint_t);
    value(&mut conf.alert, prev.alert, NGX_CONF_UNSET_UINT, Alert::InternalError as ngx_uint_t);
    value(&mut conf.log_level, prev.log_level, NGX_CONF_UNSET_UINT, NGX_LOG_INFO as ngx_uint_t);

    if conf.allow.is_none() {
        conf.allow.clone_from(&prev.allow);
    }

    if conf.rate.is_none() {
        conf.rate = prev.rate;
    }
    if conf.breaker.is_none() {
        conf.breaker = prev.breaker;
    }
    if conf.breaker.is_none() {
        conf.breaker = Some(BreakerSettings {
            errors: DEFAULT_BREAKER.0,
            cooldown: DEFAULT_BREAKER.1,
            probe_timeout: 0,
        });
    }
    if conf.thread_pool_name.data.is_null() {
        conf.thread_pool_name = prev.thread_pool_name;
    }

    if conf.zone.is_null() {
        conf.zone = prev.zone;
    }
    if conf.trusted_certificate.data.is_null() {
        conf.trusted_certificate = prev.trusted_certificate;
    }
}

/// Checks a server where the guard is on and builds its lookup client.
fn finish(cf: *mut ngx_conf_t, conf: &mut SrvConf, prev: &mut SrvConf) -> Result<(), String> {
    let Some(zone) = (unsafe { conf.zone.as_mut() }) else {
        return Err("no \"sni_guard_zone\" is defined".into());
    };

    // A server with its own lookup or certificate gets its own client; servers that inherit
    // both from the http level share one, and so share its keep-alive connection.
    let inherits = conf.lookup.is_none() && conf.trusted_certificate == prev.trusted_certificate;

    if conf.lookup.is_none() {
        conf.lookup.clone_from(&prev.lookup);
    }

    let Some((url, addrs)) = conf.lookup.clone() else {
        return Err("no \"sni_guard_lookup\" is defined".into());
    };

    // SAFETY: the zone was added by `cmd_set_zone`, which set `data` to its context.
    let ctx = unsafe { &mut *zone.data.cast::<ZoneCtx>() };
    if let Some(other) = &ctx.url {
        if !same_service(other, &url) {
            return Err(format!(
                "zone \"{}\" is already used with lookup \"{other}\"; \
                 a zone caches the answers of one lookup service, so \"{url}\" needs its own zone",
                ctx.name
            ));
        }
    }
    ctx.url = Some(url.clone());

    let certificate = conf.trusted_certificate.as_bytes();
    if ctx.trusted_certificate.as_ref().is_some_and(|other| other != certificate) {
        return Err(format!(
            "zone \"{}\" is already used with another \"sni_guard_lookup_trusted_certificate\"",
            ctx.name
        ));
    }
    ctx.trusted_certificate = Some(certificate.to_vec());

    // The budget and the breaker are the zone's: one setting per zone.
    let breaker = conf.breaker;
    match (&ctx.rate, &ctx.breaker) {
        (Some(rate), _) if *rate != conf.rate() => {
            return Err(format!(
                "zone \"{}\" is already used with another \"sni_guard_lookup_rate\"",
                ctx.name
            ));
        }
        (_, Some(other)) if Some(*other) != breaker => {
            return Err(format!(
                "zone \"{}\" is already used with another \"sni_guard_breaker\"",
                ctx.name
            ));
        }
        _ => {}
    }
    ctx.rate = Some(conf.rate());
    ctx.breaker = breaker;

    add_thread_pool(cf, conf)?;

    if inherits {
        if let Some(client) = &prev.client {
            conf.client = Some(client.clone());
            return Ok(());
        }
    }

    let client = Arc::new(build_client(cf, url, addrs, conf.trusted_certificate)?);

    if inherits {
        prev.client = Some(client.clone());
    }
    conf.client = Some(client);

    Ok(())
}

/// Registers the thread pool that refreshes answers in the background.
fn add_thread_pool(cf: *mut ngx_conf_t, conf: &mut SrvConf) -> Result<(), String> {
    let name = if conf.thread_pool_name.is_empty() {
        ptr::null_mut()
    } else {
        ptr::addr_of_mut!(conf.thread_pool_name)
    };
    // SAFETY: called while the configuration is parsed; a null name means nginx's "default"
    // pool, which nginx then creates with its default size unless `thread_pool` sizes it.
    conf.thread_pool = unsafe { nginx_sys::ngx_thread_pool_add(cf, name) };
    if conf.thread_pool.is_null() {
        return Err("could not add \"sni_guard_thread_pool\"".into());
    }
    Ok(())
}

/// Whether two lookup URLs name the same service and request, whatever their spelling.
fn same_service(a: &LookupUrl, b: &LookupUrl) -> bool {
    a.scheme() == b.scheme()
        && a.host().eq_ignore_ascii_case(b.host())
        && a.port() == b.port()
        && a.path_and_query() == b.path_and_query()
}

fn build_client(
    cf: *mut ngx_conf_t,
    url: LookupUrl,
    addrs: Vec<std::net::SocketAddr>,
    mut certificate: ngx_str_t,
) -> Result<Client, String> {
    let (path, trusted_ca_pem) = if certificate.is_empty() {
        (None, None)
    } else {
        // SAFETY: `cf->cycle` is the cycle being configured; the name is allocated in its pool.
        if unsafe { ngx_conf_full_name((*cf).cycle, &mut certificate, 1) } != 0 {
            return Err("could not resolve \"sni_guard_lookup_trusted_certificate\"".into());
        }
        let path = String::from_utf8_lossy(certificate.as_bytes()).into_owned();
        let pem = read_ca_file(&path).map_err(|e| {
            format!(
                "cannot load \"sni_guard_lookup_trusted_certificate\" \"{path}\" {}",
                os_error(&e)
            )
        })?;
        (Some(path), Some(pem))
    };

    let opts = ClientOptions {
        trusted_ca_pem,
        max_body: MAX_REPLY_BODY,
        user_agent: concat!("nginx-sni-guard/", env!("CARGO_PKG_VERSION")).into(),
    };

    Client::new(url, addrs, opts).map_err(|e| match path {
        Some(path) => {
            format!("invalid \"sni_guard_lookup_trusted_certificate\" \"{path}\": {e}")
        }
        None => format!("unusable \"sni_guard_lookup\": {e}"),
    })
}

extern "C" fn cmd_set_lookup(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the server configuration and the directive's two words.
    let (conf, value) = unsafe { (&mut *conf.cast::<SrvConf>(), arg(cf, 1)) };

    if conf.lookup.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }

    let text = String::from_utf8_lossy(value.as_bytes());

    let url = match LookupUrl::parse(&text) {
        Ok(url) => url,
        Err(e) => {
            return invalid(cf, format_args!("invalid URL \"{text}\": {e}"));
        }
    };

    let addrs = match url.resolve() {
        Ok(addrs) if !addrs.is_empty() => addrs,
        Ok(_) => {
            return invalid(cf, format_args!("host not found in \"{text}\""));
        }
        Err(e) => {
            return invalid(cf, format_args!("host not found in \"{text}\": {e}"));
        }
    };

    conf.lookup = Some((url, addrs));
    NGX_CONF_OK
}

extern "C" fn cmd_set_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the server configuration and the directive's two words.
    let (conf, value) = unsafe { (&mut *conf.cast::<SrvConf>(), arg(cf, 1)) };

    if !conf.zone.is_null() {
        return c"is duplicate".as_ptr().cast_mut();
    }

    let bytes = value.as_bytes();
    let Some(colon) = bytes.iter().position(|&b| b == b':').filter(|&i| i > 0) else {
        return invalid(cf, format_args!("invalid zone \"{value}\", expected NAME:SIZE"));
    };

    let mut name = ngx_str_t { len: colon, data: value.data };
    let mut size_text =
        ngx_str_t { len: value.len - colon - 1, data: unsafe { value.data.add(colon + 1) } };

    // SAFETY: `size_text` points into the directive's argument.
    let size = unsafe { ngx_parse_size(&mut size_text) };
    if size == -1 {
        return invalid(cf, format_args!("invalid zone size \"{value}\""));
    }
    let size = size as usize;

    if size < zone::MIN_SIZE {
        return invalid(cf, format_args!("zone \"{name}\" is too small, the minimum is 64k"));
    }
    if size > zone::MAX_SIZE {
        return invalid(cf, format_args!("zone \"{name}\" is too large, the maximum is 4g"));
    }

    // SAFETY: the tag is the module's address, as nginx's own modules use; the zone is checked
    // for a different use or size by nginx itself.
    let shm_zone = unsafe {
        ngx_shared_memory_add(
            cf,
            &mut name,
            size,
            ptr::addr_of_mut!(crate::ngx_http_sni_guard_module).cast(),
        )
    };
    let Some(shm_zone) = (unsafe { shm_zone.as_mut() }) else {
        return NGX_CONF_ERROR;
    };

    if shm_zone.data.is_null() {
        // SAFETY: the configuration pool lives as long as the zone's configuration.
        let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
        let ctx = pool.allocate(ZoneCtx::new(&name));
        if ctx.is_null() {
            return NGX_CONF_ERROR;
        }
        shm_zone.data = ctx.cast();
        shm_zone.init = Some(zone::init);

        // SAFETY: the directive is parsed inside the http block, whose main configuration
        // exists.
        let Some(main) = (unsafe { Module::main_conf_mut(&*cf) }) else {
            return NGX_CONF_ERROR;
        };
        main.zones.push(shm_zone);
    }

    conf.zone = shm_zone;
    NGX_CONF_OK
}

extern "C" fn cmd_set_rate(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the server configuration and the directive's words.
    let conf = unsafe { &mut *conf.cast::<SrvConf>() };
    let args = unsafe { (*(*cf).args).as_slice::<ngx_str_t>() };

    if conf.rate.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }

    let words: Vec<String> =
        args[1..].iter().map(|a| String::from_utf8_lossy(a.as_bytes()).into_owned()).collect();

    if words[0] == "off" && words.len() == 1 {
        conf.rate = Some((None, None));
        return NGX_CONF_OK;
    }

    let Some(per_second_milli) = Rate::parse_per_second_milli(&words[0]) else {
        return invalid(cf, format_args!("invalid rate \"{}\"", words[0]));
    };
    let mut rate = Rate { per_second_milli, burst: 0 };
    let mut per_client = None;

    for (i, word) in words.iter().enumerate().skip(1) {
        let key = word.split('=').next().unwrap_or_default();
        if words[1..i].iter().any(|w| w.split('=').next() == Some(key)) {
            return invalid(cf, format_args!("duplicate parameter \"{key}\""));
        }
        if let Some(burst) = word.strip_prefix("burst=") {
            match burst.parse::<u32>() {
                Ok(burst) => rate.burst = burst.into(),
                Err(_) => {
                    return invalid(cf, format_args!("invalid burst value \"{word}\""));
                }
            }
        } else if let Some(client) = word.strip_prefix("per_client=") {
            match Rate::parse_per_second_milli(client) {
                Some(milli) => per_client = Some(milli),
                None => {
                    return invalid(cf, format_args!("invalid per_client rate \"{word}\""));
                }
            }
        } else {
            return invalid(cf, format_args!("invalid parameter \"{word}\""));
        }
    }

    if per_client.is_some_and(|milli| milli > rate.per_second_milli) {
        return invalid(cf, format_args!("per_client rate is more than the rate"));
    }

    // A client's share has a burst in proportion to its rate, and of at least one.
    let per_client = per_client.map(|milli| Rate {
        per_second_milli: milli,
        burst: rate.burst.saturating_mul(milli).div_ceil(rate.per_second_milli).max(1),
    });

    conf.rate = Some((Some(rate), per_client));
    NGX_CONF_OK
}

extern "C" fn cmd_set_breaker(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the server configuration and the directive's words.
    let conf = unsafe { &mut *conf.cast::<SrvConf>() };
    let args = unsafe { (*(*cf).args).as_slice::<ngx_str_t>() };

    if conf.breaker.is_some() {
        return c"is duplicate".as_ptr().cast_mut();
    }

    let off = BreakerSettings { errors: 0, cooldown: 0, probe_timeout: 0 };

    match args {
        [_, word] if word.as_bytes() == b"off" => {
            conf.breaker = Some(off);
            NGX_CONF_OK
        }
        [_, errors, cooldown] => {
            let errors = std::str::from_utf8(errors.as_bytes())
                .ok()
                .and_then(|e| e.parse::<u32>().ok())
                .filter(|&e| e > 0);
            let Some(errors) = errors else {
                return invalid(cf, format_args!("invalid number of errors \"{}\"", args[1]));
            };
            let mut text = *cooldown;
            // SAFETY: `text` is the directive's argument.
            let cooldown = unsafe { ngx_parse_time(&mut text, 0) };
            if cooldown <= 0 {
                return invalid(cf, format_args!("invalid cool-down time \"{}\"", args[2]));
            }
            conf.breaker = Some(BreakerSettings { errors, cooldown: cooldown as u64, ..off });
            NGX_CONF_OK
        }
        _ => invalid(
            cf,
            format_args!(
                "invalid value \"{}\", it must be \"off\" or a number of errors and a time",
                args[1]
            ),
        ),
    }
}

/// One of the words the directive's table lists (its `post`); unlike nginx's enum slot, an
/// unknown word is answered with the words that are known.
extern "C" fn cmd_set_enum(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the directive, whose `offset` is of an ngx_uint_t field of `conf`
    // and whose `post` is a table ended by an empty name, and its one word.
    let (cmd, value) = unsafe { (&*cmd, arg(cf, 1)) };
    let field = unsafe { &mut *conf.cast::<u8>().add(cmd.offset).cast::<ngx_uint_t>() };
    let mut choices = Vec::new();
    let mut entry = cmd.post.cast::<ngx_conf_enum_t>();
    // SAFETY: see above; the table ends with an entry whose name is empty.
    while let Some(e) = unsafe { entry.as_ref() }.filter(|e| !e.name.is_empty()) {
        choices.push(e);
        entry = unsafe { entry.add(1) };
    }

    if *field != NGX_CONF_UNSET_UINT {
        return c"is duplicate".as_ptr().cast_mut();
    }
    match choices.iter().find(|e| e.name.as_bytes().eq_ignore_ascii_case(value.as_bytes())) {
        Some(e) => {
            *field = e.value;
            NGX_CONF_OK
        }
        None => {
            let names: Vec<String> = choices.iter().map(|e| format!("\"{}\"", e.name)).collect();
            let (last, rest) = names.split_last().map_or(("", &[][..]), |(l, r)| (l.as_str(), r));
            invalid(
                cf,
                format_args!("invalid value \"{value}\", it must be {} or {last}", rest.join(", ")),
            )
        }
    }
}

extern "C" fn cmd_set_timeout(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // A miss blocks the worker for up to this long.
    set_msec_within(cf, cmd, conf, 1..=MAX_TIMEOUT, "more than 0 and at most 10s")
}

extern "C" fn cmd_set_stale(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_msec_within(cf, cmd, conf, 0..=MAX_STALE, "at most 49d")
}

/// nginx's string slot, for a name that must not be empty.
fn set_name(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
    what: &str,
) -> *mut c_char {
    // SAFETY: the directive's one word.
    if unsafe { arg(cf, 1) }.is_empty() {
        return invalid(cf, format_args!("needs {what}"));
    }
    // SAFETY: nginx's own handler for the directive's ngx_str_t field.
    unsafe { ngx_conf_set_str_slot(cf, cmd, conf) }
}

/// nginx's time slot, and a range the time must be in.
fn set_msec_within(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
    range: core::ops::RangeInclusive<ngx_msec_t>,
    range_text: &str,
) -> *mut c_char {
    // SAFETY: nginx's own handler for the directive's ngx_msec_t field, which has no `post`.
    let rv = unsafe { ngx_conf_set_msec_slot(cf, cmd, conf) };
    if rv != NGX_CONF_OK {
        return rv;
    }
    // SAFETY: the field `offset` names, just set.
    let value = unsafe { *conf.cast::<u8>().add((*cmd).offset).cast::<ngx_msec_t>() };
    if !range.contains(&value) {
        return invalid(cf, format_args!("time must be {range_text}"));
    }
    NGX_CONF_OK
}

extern "C" fn cmd_set_file(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    set_name(cf, cmd, conf, "a file name")
}

extern "C" fn cmd_set_thread_pool(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let rv = set_name(cf, cmd, conf, "a thread pool's name");
    if rv != NGX_CONF_OK {
        return rv;
    }
    // Registered here, so that nginx's "unknown thread pool" names this line; once the guard
    // is on, the server finds the same pool again.
    // SAFETY: `conf` is the server configuration; the name was just set from the directive.
    let name = unsafe { &mut (*conf.cast::<SrvConf>()).thread_pool_name };
    if unsafe { nginx_sys::ngx_thread_pool_add(cf, name) }.is_null() {
        return NGX_CONF_ERROR;
    }
    NGX_CONF_OK
}

extern "C" fn cmd_set_allow(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the server configuration and the directive's words.
    let conf = unsafe { &mut *conf.cast::<SrvConf>() };
    let args = unsafe { (*(*cf).args).as_slice::<ngx_str_t>() };

    let list = conf.allow.get_or_insert_with(AllowList::default);

    for arg in &args[1..] {
        let text = String::from_utf8_lossy(arg.as_bytes());
        if let Err(e) = list.add(&text) {
            return invalid(cf, format_args!("invalid name \"{text}\": {e}"));
        }
    }

    NGX_CONF_OK
}

extern "C" fn cmd_set_status(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the location configuration.
    let conf = unsafe { &mut *conf.cast::<LocConf>() };
    set_handler(cf, conf, "sni_guard_status", crate::status::status_handler)
}

extern "C" fn cmd_set_purge(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: nginx passes the location configuration and the directive's words.
    let conf = unsafe { &mut *conf.cast::<LocConf>() };
    let args = unsafe { (*(*cf).args).as_slice::<ngx_str_t>() };
    if let [_, zone] = args {
        if zone.is_empty() {
            return invalid(cf, format_args!("needs a zone's name, or none for every zone"));
        }
        conf.purge_zone = *zone;
    }
    set_handler(cf, conf, "sni_guard_purge", crate::status::purge_handler)
}

/// Makes a content handler the handler of the location being parsed.
fn set_handler(
    cf: *mut ngx_conf_t,
    conf: &mut LocConf,
    directive: &'static str,
    handler: ContentHandler,
) -> *mut c_char {
    // SAFETY: location directives are parsed with the location's context in `cf`.
    let Some(clcf) = (unsafe { NgxHttpCoreModule::location_conf_mut(&*cf) }) else {
        return NGX_CONF_ERROR;
    };
    match clcf.handler {
        Some(h) if core::ptr::fn_addr_eq(h, handler) => return c"is duplicate".as_ptr().cast_mut(),
        Some(_) => {
            return c"cannot be used with another content handler in one location"
                .as_ptr()
                .cast_mut()
        }
        None => {}
    }
    clcf.handler = Some(handler);
    conf.handler = Some((directive, parse_position(cf)));
    NGX_CONF_OK
}

/// Fails a directive with an error that names it, as nginx names a directive whose handler
/// returns an error.
fn invalid(cf: *mut ngx_conf_t, what: core::fmt::Arguments) -> *mut c_char {
    // SAFETY: called from a directive handler, whose directive name is word 0.
    let name = unsafe { arg(cf, 0) };
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "\"{name}\" directive {what}");
    NGX_CONF_ERROR
}

/// `file:line` of the directive being parsed.
fn parse_position(cf: *mut ngx_conf_t) -> String {
    // SAFETY: a directive is always parsed from a configuration file.
    let file = unsafe { &*(*cf).conf_file };
    format!("{}:{}", String::from_utf8_lossy(file.file.name.as_bytes()), file.line)
}

/// Reads a CA file of at most [`MAX_CA_FILE`] bytes.
fn read_ca_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;

    // Only a regular file: opening a FIFO would wait for a writer, with nginx -t or a reload.
    if !std::fs::metadata(path)?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut pem = Vec::new();
    std::fs::File::open(path)?.take(MAX_CA_FILE + 1).read_to_end(&mut pem)?;
    if pem.len() as u64 > MAX_CA_FILE {
        return Err(std::io::Error::other("larger than 4 MB"));
    }
    Ok(pem)
}

/// An I/O error the way nginx prints one: "(2: No such file or directory)".
fn os_error(e: &std::io::Error) -> String {
    let text = e.to_string();
    match e.raw_os_error() {
        Some(n) => format!("({n}: {})", text.split(" (os error").next().unwrap_or(&text)),
        None => format!("({text})"),
    }
}

/// The `n`th word of the directive being parsed.
///
/// # Safety
///
/// `cf` must be the context of a directive handler whose directive has more than `n` words.
unsafe fn arg(cf: *mut ngx_conf_t, n: usize) -> ngx_str_t {
    unsafe { (*(*cf).args).as_slice::<ngx_str_t>()[n] }
}

fn file_name(cscf: &ngx_http_core_srv_conf_t) -> String {
    // SAFETY: nginx records the file a server block was defined in as a NUL-terminated string.
    if cscf.file_name.is_null() {
        return String::new();
    }
    unsafe { core::ffi::CStr::from_ptr(cscf.file_name.cast()) }.to_string_lossy().into_owned()
}

// SAFETY: these are the types `create_main_conf` and `create_loc_conf` allocate.
unsafe impl HttpModuleMainConf for Module {
    type MainConf = MainConf;
}

unsafe impl HttpModuleLocationConf for Module {
    type LocationConf = LocConf;
}

/// Server configuration of the server a core server configuration belongs to.
pub fn of_server(cscf: &ngx_http_core_srv_conf_t) -> Option<&'static SrvConf> {
    Module::server_conf(cscf)
}
