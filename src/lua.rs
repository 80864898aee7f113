//! Living with lua-nginx-module's `ssl_client_hello_by_lua*`.
//!
//! OpenSSL has one ClientHello callback per SSL_CTX and no getter for it, so the guard's, set
//! after every module has merged its configuration, replaces Lua's. To keep Lua's handler
//! running, after the guard, the module must know which servers configured one: while the http
//! block is parsed, it wraps the handlers of Lua's two directives to note the servers, and hands
//! them back to Lua at the end of the block. The guard's callback then calls Lua's handler
//! (looked up by name) where Lua would have run: when the default server of the connection's
//! address configured it, as OpenSSL takes the callback from that server's SSL_CTX.

use core::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

use nginx_sys::{
    dlsym, ngx_command_t, ngx_conf_t, ngx_http_conf_ctx_t, ngx_pool_cleanup_add,
    NGX_HTTP_MAIN_CONF, SSL,
};
use ngx::core::NGX_CONF_ERROR;
use ngx::http::HttpModuleMainConf;

use crate::Module;

const LUA_MODULE: &CStr = c"ngx_http_lua_module";
const LUA_HANDLER: &CStr = c"ngx_http_lua_ssl_client_hello_handler";
const DIRECTIVES: [&[u8]; 2] = [b"ssl_client_hello_by_lua_block", b"ssl_client_hello_by_lua_file"];

/// A directive handler, as nginx calls it.
type SetFn = unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

/// Lua's ClientHello callback.
pub type ClientHelloFn = unsafe extern "C" fn(*mut SSL, *mut c_int, *mut c_void) -> c_int;

/// One of Lua's directives and its own handler, while the guard's wrapper stands in for it.
struct Wrapped(*mut ngx_command_t, SetFn);

// SAFETY: the pointer is only used by the master process, on the thread that parses the
// configuration.
unsafe impl Send for Wrapped {}

static WRAPPED: Mutex<Vec<Wrapped>> = Mutex::new(Vec::new());

/// Where `ssl_client_hello_by_lua*` is configured in the http block being parsed.
#[derive(Debug, Default)]
pub struct LuaClientHello {
    /// Set at the http level: every server inherits it.
    pub everywhere: bool,
    /// The `srv_conf` arrays of the servers that set it themselves.
    pub servers: Vec<*mut *mut c_void>,
}

impl LuaClientHello {
    pub fn is_empty(&self) -> bool {
        !self.everywhere && self.servers.is_empty()
    }

    /// Whether the server with this `srv_conf` array runs Lua's ClientHello handler.
    pub fn runs_for(&self, srv_conf: *mut *mut c_void) -> bool {
        self.everywhere || self.servers.contains(&srv_conf)
    }
}

/// Wraps Lua's directives, if Lua is loaded; runs when the http block starts.
pub fn wrap(cf: *mut ngx_conf_t) {
    // SAFETY: during configuration the cycle's module list is complete and stable; the command
    // tables of loaded modules are writable data that nginx only reads while parsing.
    unsafe {
        let cycle = &*(*cf).cycle;
        let modules = core::slice::from_raw_parts(cycle.modules, cycle.modules_n);
        let Some(lua) = modules
            .iter()
            .filter_map(|m| m.as_ref())
            .find(|m| !m.name.is_null() && CStr::from_ptr(m.name) == LUA_MODULE)
        else {
            return;
        };

        let mut wrapped = WRAPPED.lock().unwrap_or_else(|e| e.into_inner());
        let mut cmd = lua.commands;
        while !cmd.is_null() && (*cmd).name.len != 0 {
            if DIRECTIVES.contains(&(*cmd).name.as_bytes()) {
                if let Some(set) =
                    (*cmd).set.filter(|&set| set as usize != wrapper as SetFn as usize)
                {
                    wrapped.push(Wrapped(cmd, set));
                    (*cmd).set = Some(wrapper);
                }
            }
            cmd = cmd.add(1);
        }

        // Hand the directives back even if the configuration fails before the block ends.
        let cln = ngx_pool_cleanup_add((*cf).pool, 0);
        if let Some(cln) = cln.as_mut() {
            cln.handler = Some(unwrap_on_cleanup);
        }
    }
}

/// Hands Lua's directives back their own handlers; runs when the http block ends.
pub fn unwrap() {
    let mut wrapped = WRAPPED.lock().unwrap_or_else(|e| e.into_inner());
    for Wrapped(cmd, set) in wrapped.drain(..) {
        // SAFETY: `cmd` is in the command table of a module that is still loaded: the wrapping
        // and the unwrapping happen within one parse of the configuration.
        unsafe { (*cmd).set = Some(set) };
    }
}

unsafe extern "C" fn unwrap_on_cleanup(_data: *mut c_void) {
    unwrap();
}

/// Stands in for Lua's directive handler: notes the server, then lets Lua have the directive.
unsafe extern "C" fn wrapper(
    cf: *mut ngx_conf_t,
    cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    let original = {
        let wrapped = WRAPPED.lock().unwrap_or_else(|e| e.into_inner());
        wrapped.iter().find(|w| w.0 == cmd).map(|w| w.1)
    };
    let Some(original) = original else {
        return NGX_CONF_ERROR;
    };

    // SAFETY: nginx passes the directive's context; inside the http block it is the http
    // module's context, whose main configuration holds the module's.
    unsafe {
        if let Some(main) = Module::main_conf_mut(&*cf) {
            if (*cf).cmd_type == NGX_HTTP_MAIN_CONF as usize {
                main.lua_client_hello.everywhere = true;
            } else {
                let ctx = (*cf).ctx.cast::<ngx_http_conf_ctx_t>();
                main.lua_client_hello.servers.push((*ctx).srv_conf);
            }
        }
        original(cf, cmd, conf)
    }
}

/// Lua's ClientHello handler, found by name among the symbols of the loaded modules.
pub fn client_hello_handler() -> Option<ClientHelloFn> {
    // SAFETY: nginx loads modules with RTLD_GLOBAL, so their symbols are found from the
    // default scope; the symbol, when present, is the function with this signature.
    let f = unsafe { dlsym(core::ptr::null_mut(), LUA_HANDLER.as_ptr()) };
    (!f.is_null()).then(|| unsafe { core::mem::transmute::<*mut c_void, ClientHelloFn>(f) })
}
