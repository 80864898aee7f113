#!/usr/bin/perl

# Tests for sni_guard: an expired "registered" answer is used at once while the
# name is refreshed in the background, on nginx's thread pool; one refresh of a
# name runs at a time across all workers, and its answer replaces the old one.

###############################################################################

use warnings;
use strict;

use Test::More;
use Time::HiRes qw/ time /;

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
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    sni_guard_zone    guard:1m;
    sni_guard_lookup  http://127.0.0.1:%%PORT_8081%%/check;
    sni_guard_timeout 3s;
    sni_guard_valid   1s;

    server {
        listen       127.0.0.1:8443 ssl reuseport;
        sni_guard    on;
        return 200  "name $ssl_server_name";
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'shop.example.com', 'leaving.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(8)->run();

###############################################################################

my $port = port(8443);

is(tls_get($port, 'shop.example.com')->{body}, 'name shop.example.com',
	'registered name looked up and served');

# The service becomes slow, though healthy: a refresh takes 1.5 s. Once the answer
# has expired, handshakes do not wait for it.

lookup_conf($d, mode => 'slow 1500',
	registered => [ 'shop.example.com', 'leaving.example.com' ]);
select undef, undef, undef, 1.2;

my ($served, $slowest) = (0, 0);
for (1 .. 10) {
	my $start = time();
	$served++ if (tls_get($port, 'shop.example.com')->{body} // '') eq 'name shop.example.com';
	my $took = time() - $start;
	$slowest = $took if $took > $slowest;
}

is($served, 10, 'expired answer: 10 handshakes served from it');
cmp_ok($slowest, '<', 1, 'expired answer: no handshake waited for the 1.5 s lookup');

wait_for(3, sub { lookup_count($d, 'shop.example.com') >= 2 });
select undef, undef, undef, 1.7;
is(lookup_count($d, 'shop.example.com'), 2,
	'one refresh for all 10 handshakes, across both workers');

tls_get($port, 'shop.example.com');
is(lookup_count($d, 'shop.example.com'), 2, 'refreshed answer is fresh again: no lookup');

# A refresh that says "not registered" replaces the answer.

lookup_conf($d, registered => [ 'shop.example.com', 'leaving.example.com' ]);
is(tls_get($port, 'leaving.example.com')->{body}, 'name leaving.example.com',
	'name about to be withdrawn: served');

lookup_conf($d, registered => [ 'shop.example.com' ]);
select undef, undef, undef, 1.2;

is(tls_get($port, 'leaving.example.com')->{body}, 'name leaving.example.com',
	'withdrawn name, answer expired: served once more while it is refreshed');

ok(wait_for(3, sub {
	(tls_get($port, 'leaving.example.com')->{error} // '') =~ /alert internal error/
}), 'withdrawn name: refused once the refresh has answered');

###############################################################################
