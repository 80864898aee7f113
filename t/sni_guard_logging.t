#!/usr/bin/perl

# Tests for sni_guard: the alert a refusal sends (sni_guard_alert), the level of
# refusal lines (sni_guard_log_level, with flood control at warn and above), and
# the $sni_guard_result variable in access logs.

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

    sni_guard        on;
    sni_guard_zone   guard:1m;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;
    sni_guard_allow  admin.example.com;

    log_format guarded '$ssl_server_name result=$sni_guard_result';

    server {
        listen       127.0.0.1:8443 ssl;
        access_log   %%TESTDIR%%/guarded.log guarded;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8444 ssl;
        sni_guard_alert unrecognized_name;
        sni_guard_log_level notice;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8445 ssl;
        sni_guard_log_level warn;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8446 ssl;
        sni_guard    off;
        access_log   %%TESTDIR%%/open.log guarded;
        return 200  "ok";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'shop.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(12)->run();

###############################################################################

# the alert

is(client_hello(port(8443), sni => 'nope.example.com')->{alert}, 80,
	'default alert: internal_error');
like(tls_get(port(8443), 'nope.example.com')->{error}, qr/tlsv1 alert internal error/,
	'internal_error as a client sees it');
is(client_hello(port(8444), sni => 'nope2.example.com')->{alert}, 112,
	'sni_guard_alert unrecognized_name');
like(tls_get(port(8444), 'nope2.example.com')->{error}, qr/unrecognized name/,
	'unrecognized_name as a client sees it');

# the level of refusal lines

my $log = $t->read_file('error.log');
like($log, qr/\[info\] .*sni_guard refused "nope.example.com"/, 'refusals at info by default');
like($log, qr/\[notice\] .*sni_guard refused "nope2.example.com"/, 'sni_guard_log_level notice');

client_hello(port(8445), sni => "flood$_.example.com") for 1 .. 40;
my @warn = grep { /\[warn\] .*sni_guard refused "flood/ } split /\n/, $t->read_file('error.log');
cmp_ok(scalar @warn, '>=', 1, 'sni_guard_log_level warn: refusals logged at warn');
cmp_ok(scalar @warn, '<=', 10, 'at warn, a flood writes at most 10 lines a second');
client_hello(port(8445), sni => 'after.example.com') for 1 .. 1;
select undef, undef, undef, 1.1;
client_hello(port(8445), sni => 'later.example.com');
like($t->read_file('error.log'), qr/refused "later.example.com": not registered \(\d+ more not logged\)/,
	'the lines held back are counted in the next one');

# the variable

tls_get(port(8443), $_) for 'shop.example.com', 'shop.example.com', 'admin.example.com';
tls_get(port(8443), undef);
tls_get(port(8446), 'open.example.com');

is($t->read_file('guarded.log'),
	"shop.example.com result=lookup\nshop.example.com result=cache\n"
	. "admin.example.com result=allow_list\n- result=no_sni\n",
	'$sni_guard_result: how each allowed handshake was decided');
is($t->read_file('open.log'), "open.example.com result=-\n",
	'$sni_guard_result: not set where the guard is off');
is(scalar grep({ /\[(warn|error|crit|alert|emerg)\]/ && !/flood|after|later/ }
	split /\n/, $t->read_file('error.log')), 0, 'nothing else logged at warn or above');

###############################################################################
