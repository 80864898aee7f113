//! ngx_http_sni_guard_module: refuses TLS handshakes for server names nobody registered.
//!
//! For each TLS handshake on a server where `sni_guard` is on, the ClientHello callback reads
//! the client's server name, answers from a cache in shared memory or asks the lookup service
//! whether the name is registered, and aborts the handshake with a fatal alert when it is not,
//! before nginx selects, loads or issues any certificate.
//!
//! The nginx side (this crate) is thin: directives, the callback, the shared zone. The rules
//! themselves live in `sni_guard_core`, which knows nothing of nginx and is unit-tested.

use core::ptr::{addr_of, addr_of_mut};

use nginx_sys::{ngx_conf_t, ngx_http_module_t, ngx_int_t, ngx_module_t, NGX_HTTP_MODULE};
use ngx::http::{HttpModule, HttpModuleServerConf};

mod conf;
mod guard;
mod hook;
mod lua;
mod refresh;
mod status;
mod variables;
mod zone;

pub(crate) struct Module;

impl HttpModule for Module {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module static is only written by nginx while it loads the configuration.
        unsafe { &*addr_of!(ngx_http_sni_guard_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        lua::wrap(cf);
        variables::add(cf)
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        lua::unwrap();
        hook::install(cf)
    }
}

// SAFETY: `conf::SrvConf` is what `conf::create_srv_conf` allocates.
unsafe impl HttpModuleServerConf for Module {
    type ServerConf = conf::SrvConf;
}

static MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(Module::preconfiguration),
    postconfiguration: Some(Module::postconfiguration),
    create_main_conf: Some(conf::create_main_conf),
    init_main_conf: None,
    create_srv_conf: Some(conf::create_srv_conf),
    merge_srv_conf: Some(conf::merge_srv_conf),
    create_loc_conf: Some(conf::create_loc_conf),
    merge_loc_conf: Some(conf::merge_loc_conf),
};

// Built by cargo alone, the library carries its own `ngx_modules` table; built by nginx's
// `--add-dynamic-module`, nginx generates the table.
#[cfg(feature = "export-modules")]
ngx::ngx_modules!(ngx_http_sni_guard_module);

#[used]
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_sni_guard_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(MODULE_CTX) as _,
    // SAFETY: only the address of the command table is taken here.
    commands: unsafe { addr_of_mut!(conf::COMMANDS[0]) },
    type_: NGX_HTTP_MODULE as _,
    ..ngx_module_t::default()
};
