#!/usr/bin/perl

# Tests for sni_guard: answers are cached in shared memory, for all workers, and
# expire after sni_guard_valid ("registered") and sni_guard_invalid ("not
# registered").

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
worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    log_format  pids  '$pid $ssl_server_name';
    access_log  %%TESTDIR%%/pids.log pids;

    sni_guard on;
    sni_guard_lookup http://127.0.0.1:%%PORT_8081%%/check;

    ssl_certificate     localhost.crt;
    ssl_certificate_key localhost.key;

    # Connections are spread over both workers by the kernel.
    server {
        listen       127.0.0.1:8443 ssl reuseport;
        server_name  localhost;

        sni_guard_zone long:1m;

        location / {
            return 200 "name $ssl_server_name";
        }
    }

    server {
        listen       127.0.0.1:8444 ssl;
        server_name  localhost;

        sni_guard_zone short:1m;
        sni_guard_valid 1s;
        sni_guard_invalid 1s;

        # expired answers are looked up on the handshake, not used while
        # refreshed (sni_guard_refresh.t tests that)
        sni_guard_stale 0;

        location / {
            return 200 "name $ssl_server_name";
        }
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'shop.example.com', 'short.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(12)->run();

###############################################################################

my ($long, $short) = (port(8443), port(8444));

# one lookup serves every worker

my $served = grep { ($_->{body} // '') eq 'name shop.example.com' }
	map { tls_get($long, 'shop.example.com') } 1 .. 20;
is($served, 20, 'registered name: 20 handshakes served');
is(lookup_count($d, 'shop.example.com'), 1, 'registered name: one lookup for all');

my %pids = map { (split ' ')[0] => 1 } grep { /shop/ } split /\n/, $t->read_file('pids.log');
is(scalar keys %pids, 2, 'the handshakes were spread over both workers');

my $refused = grep { ($_->{error} // '') =~ /alert internal error/ }
	map { tls_get($long, 'nope.example.com') } 1 .. 10;
is($refused, 10, 'unregistered name: 10 handshakes refused');
is(lookup_count($d, 'nope.example.com'), 1, 'unregistered name: one lookup for all');

# both cache times expire

tls_get($short, $_) for 'short.example.com', 'gone.example.com';
tls_get($short, $_) for 'short.example.com', 'gone.example.com';

is(lookup_count($d, 'short.example.com'), 1, 'registered: cached within its time');
is(lookup_count($d, 'gone.example.com'), 1, 'not registered: cached within its time');

select undef, undef, undef, 1.5;

is(tls_get($short, 'short.example.com')->{body}, 'name short.example.com',
	'registered, expired: served');
is(lookup_count($d, 'short.example.com'), 2, 'registered: looked up again after 1s');
like(tls_get($short, 'gone.example.com')->{error}, qr/alert internal error/,
	'not registered, expired: refused');
is(lookup_count($d, 'gone.example.com'), 2, 'not registered: looked up again after 1s');

# the zone with the default times kept its answer meanwhile

tls_get($long, 'shop.example.com');
is(lookup_count($d, 'shop.example.com'), 1, 'default sni_guard_valid: still cached');

###############################################################################
