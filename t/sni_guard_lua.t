#!/usr/bin/perl

# Tests for sni_guard with lua-nginx-module alongside: an ssl_certificate_by_lua
# handler standing in for an ACME issuer is reached only for registered names,
# and an ssl_client_hello_by_lua handler on the same server runs too, after the
# guard - whichever module is loaded first.

###############################################################################

use warnings;
use strict;

use Test::More;

BEGIN { use FindBin; chdir($FindBin::Bin); }

use lib 'lib';
use Test::Nginx;
use Test::Nginx::SNIGuard qw/ :all /;

###############################################################################

select STDERR; $| = 1;
select STDOUT; $| = 1;

# load_module lines for lua-nginx-module (and the NDK it needs), for the nginx
# under test; scripts/test sets them for Debian's nginx.
my $lua = $ENV{TEST_NGINX_LUA_MODULES}
	or plan(skip_all => 'no Lua module for this nginx: TEST_NGINX_LUA_MODULES is not set');

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

my $conf = <<'EOF';

@FIRST@
@SECOND@

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard        on;
    sni_guard_zone   guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

    # an issuer that would ask a CA for a certificate
    ssl_certificate_by_lua_block {
        ngx.log(ngx.NOTICE, "would issue for ",
                require("ngx.ssl").server_name() or "(none)")
    }

    server {
        listen       127.0.0.1:8443 ssl default_server;

        ssl_client_hello_by_lua_block {
            local hello = require "ngx.ssl.clienthello"
            ngx.log(ngx.NOTICE, "lua client hello for ",
                    hello.get_client_hello_server_name() or "(none)")
        }

        return 200 "ok";
    }

    server {
        listen       127.0.0.1:8444 ssl default_server;
        return 200 "ok";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ map { ("shop$_.example.com", "blog$_.example.com") } 1, 2 ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(2 * 9);

###############################################################################

my %order = (1 => 'Lua module loaded first', 2 => 'sni_guard loaded first');

for my $n (1, 2) {
	my ($first, $second) = $n == 1 ? ($lua, '%%TEST_GLOBALS%%') : ('%%TEST_GLOBALS%%', $lua);
	(my $c = $conf) =~ s/\@FIRST\@/$first/;
	$c =~ s/\@SECOND\@/$second/;
	$t->write_file_expand('nginx.conf', $c);
	$t->run();

	my $why = $order{$n};

	is(tls_get(port(8443), "shop$n.example.com")->{body}, 'ok',
		"$why: registered name served");
	like(tls_get(port(8443), "evil$n.example.com")->{error}, qr/alert internal error/,
		"$why: unregistered name refused");
	is(client_hello(port(8443), sni => "bad_name$n.example")->{alert}, 80,
		"$why: invalid name refused");
	is(tls_get(port(8444), "blog$n.example.com")->{body}, 'ok',
		"$why: registered name served, no client hello handler");
	like(tls_get(port(8444), "evil$n.example.net")->{error}, qr/alert internal error/,
		"$why: unregistered name refused, no client hello handler");

	$t->stop();

	my $log = $t->read_file('error.log');

	like($log, qr/lua client hello for shop$n\.example\.com/,
		"$why: Lua's client hello handler ran for the registered name");
	unlike($log, qr/lua client hello for (evil|bad_name)$n/,
		"$why: ... and not for refused names: the guard runs first");
	is(join(" ", sort map { /would issue for ([^,\s]+)/ } grep { /\Q$n.example\E/ }
		split /\n/, $log), "blog$n.example.com shop$n.example.com",
		"$why: the issuer was reached for the registered names only");
	unlike($log, qr/\[(alert|crit|emerg)\]/, "$why: nothing worse than an error logged");
}

###############################################################################
