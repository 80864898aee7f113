#!/usr/bin/perl

# Tests for sni_guard: sni_guard_purge removes one name, or every name, from the
# cache, so that a removed domain stops at once and a newly added one works at
# once despite a cached "not registered".

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

my $t = Test::Nginx->new()->has(qw/http http_ssl access/)->has_daemon('openssl');

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

    sni_guard_lookup  http://127.0.0.1:%%PORT_8081%%/check;

    server {
        listen       127.0.0.1:8443 ssl reuseport;
        sni_guard    on;
        sni_guard_zone guard:1m;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8444 ssl;
        sni_guard    on;
        sni_guard_zone other:1m;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8080;

        location /purge {
            sni_guard_purge;
        }

        location /purge/other {
            sni_guard_purge other;
        }

        location /denied {
            deny all;
            sni_guard_purge;
        }
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'leaving.example.com', 'kept.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(22)->run();

###############################################################################

my ($guard, $other) = (port(8443), port(8444));

sub purge {
	my ($query) = @_;
	my $r = http("DELETE /purge$query HTTP/1.0\r\nHost: localhost\r\n\r\n");
	return ($r =~ m!^HTTP/1.1 (\d+)!)[0];
}

sub outcome {
	my ($port, $name) = @_;
	my $r = tls_get($port, $name);
	return $r->{ok} ? 'served' : $r->{error} =~ /alert internal error/ ? 'refused' : $r->{error};
}

# a removed domain stops at once

is(outcome($guard, 'leaving.example.com'), 'served', 'registered name served');
lookup_conf($d, registered => [ 'kept.example.com' ]);
is(outcome($guard, 'leaving.example.com'), 'served', 'removed at the service: still cached');

is(purge('?name=leaving.example.com'), 204, 'purge one name: 204');
is(outcome($guard, 'leaving.example.com'), 'refused', 'purged name: looked up again, refused');
is(lookup_count($d, 'leaving.example.com'), 2, 'purged name: one more lookup');

# a newly added domain works at once

is(outcome($guard, 'new.example.com'), 'refused', 'unknown name refused, and cached');
lookup_conf($d, registered => [ 'kept.example.com', 'new.example.com' ]);
is(outcome($guard, 'new.example.com'), 'refused', 'added at the service: still refused from the cache');
is(purge('?name=New.Example.COM.'), 204, 'purge by any spelling of the name: 204');
is(outcome($guard, 'new.example.com'), 'served', 'added name: served at once');

is(purge('?name=never.example.com'), 404, 'purge of a name not cached: 404');
is(purge('?name=bad_name.example'), 400, 'purge of an invalid name: 400');

# any other query is refused, never read as "everything"

is(purge('?domain=new.example.com'), 400, 'purge with another parameter: 400');
is(purge('?name'), 400, 'purge with a name without a value: 400');
is(purge('?&'), 400, 'purge with a query of separators only: 400');
is(purge('?name=new.example.com&name=kept.example.com'), 400, 'purge of two names: 400');
outcome($guard, 'new.example.com');
is(lookup_count($d, 'new.example.com'), 2, 'refused purges removed nothing');

# purge all, and per zone

outcome($guard, 'kept.example.com');
outcome($other, 'kept.example.com');
is(http("DELETE /purge/other HTTP/1.0\r\nHost: localhost\r\n\r\n") =~ m!^HTTP/1.1 204! ? 1 : 0,
	1, 'purge every name of one zone: 204');
outcome($guard, 'kept.example.com');
outcome($other, 'kept.example.com');
is(lookup_count($d, 'kept.example.com'), 3, 'only the named zone was emptied');

is(purge(''), 204, 'purge everything: 204');
outcome($guard, 'kept.example.com');
is(lookup_count($d, 'kept.example.com'), 4, 'everything purged: looked up again');

like(http_get('/purge?name=kept.example.com'), qr!^HTTP/1.1 405!, 'GET: 405');
like(http("DELETE /denied?name=kept.example.com HTTP/1.0\r\nHost: localhost\r\n\r\n"),
	qr!^HTTP/1.1 403!, 'the location is protected with nginx access rules');

###############################################################################
