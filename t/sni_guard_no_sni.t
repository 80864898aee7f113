#!/usr/bin/perl

# Tests for sni_guard: a handshake without a server name has no name to issue a
# certificate for, so it goes on by default; sni_guard_no_sni refuse refuses it.

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

my $t = Test::Nginx->new()->has(qw/http http_ssl/)->has_daemon('openssl');

$t->write_file_expand('nginx.conf', <<'EOF');

%%TEST_GLOBALS%%

daemon off;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard_zone guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

    server {
        listen       127.0.0.1:8443 ssl;
        sni_guard    on;
        return 200  "allowed";
    }

    server {
        listen       127.0.0.1:8444 ssl;
        sni_guard    on;
        sni_guard_no_sni refuse;
        return 200  "refusing";
    }

    server {
        listen       127.0.0.1:8445 ssl;
        sni_guard_no_sni refuse;
        return 200  "unguarded";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => []);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(6)->run();

###############################################################################

is(tls_get(port(8443), undef)->{body}, 'allowed', 'no server name: allowed by default');

like(tls_get(port(8444), undef)->{error}, qr/alert internal error/,
	'no server name: refused with sni_guard_no_sni refuse');
is(client_hello(port(8444), neither => 1)->{alert}, 80,
	'no server name: refused with internal_error');

is(tls_get(port(8445), undef)->{body}, 'unguarded',
	'sni_guard_no_sni has no effect where the guard is off');

is(scalar lookups($d), 0, 'no lookups');

like($t->read_file('error.log'), qr/sni_guard refused handshake: no server name/,
	'refusal logged');

###############################################################################
