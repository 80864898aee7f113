#!/usr/bin/perl

# Tests for sni_guard: sni_guard_status reports every zone's counters, summed
# over all workers, as JSON and in the Prometheus text format; known handshakes
# move each counter by exactly what they should.

###############################################################################

use warnings;
use strict;

use Test::More;
use JSON::PP;

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

    sni_guard_lookup  http://127.0.0.1:%%PORT_8081%%/check;
    sni_guard_breaker off;

    server {
        listen       127.0.0.1:8443 ssl reuseport;
        sni_guard    on;
        sni_guard_zone guard:1m;
        sni_guard_allow admin.example.com;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8444 ssl;
        sni_guard    on;
        sni_guard_zone tight:1m;
        sni_guard_lookup_rate 1r/m;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8445 ssl;
        sni_guard    on;
        sni_guard_zone short:1m;
        sni_guard_valid 1s;
        return 200  "ok";
    }

    server {
        listen       127.0.0.1:8080;

        location /status {
            sni_guard_status;
        }
    }
}

EOF

my $d = $t->testdir();
make_cert($d, 'localhost');
lookup_conf($d, registered => [ 'shop.example.com', 'stale.example.com' ]);

$t->run_daemon(\&lookup_daemon, port(8081), $d);
$t->waitforfile("$d/lookup.pid") or die "lookup service did not start";

$t->plan(24)->run();

###############################################################################

# Flattens the JSON report into "zone.path.to.counter" => value; latency buckets
# become "zone.lookup_latency.buckets.N" => count.
sub json_counters {
	my ($body) = http_get('/status') =~ /\x0d\x0a\x0d\x0a(.*)/s;
	my %flat;
	my $doc = decode_json($body)->{zones};
	my @stack = map { [ $_, $doc->{$_} ] } keys %$doc;
	while (my $item = pop @stack) {
		my ($prefix, $v) = @$item;
		if (ref $v eq 'HASH') {
			push @stack, map { [ "$prefix.$_", $v->{$_} ] } keys %$v;
		} elsif (ref $v eq 'ARRAY') {
			$flat{"$prefix.$_"} = $v->[$_]{count} for 0 .. $#$v;
		} else {
			$flat{$prefix} = $v;
		}
	}
	return \%flat;
}

# Reads the Prometheus text into "metric{labels}" => value.
sub prometheus_counters {
	my ($body) = http_get('/status?format=prometheus') =~ /\x0d\x0a\x0d\x0a(.*)/s;
	return { map { /^(\S+) (\S+)$/ ? ($1 => $2) : () } grep { !/^#/ } split /\n/, $body };
}

# The counters that changed between two readings, as "name=delta", leaving out the
# ones whose change cannot be known in advance: which latency bucket, the latency
# sum, bytes used.
sub deltas {
	my ($before, $after) = @_;
	my $unknown = qr/latency\.buckets|latency\.sum_ms|bytes_used
		|duration_seconds_bucket\{zone="\w+",le="(?!\+Inf)|duration_seconds_sum/x;
	my @changed = grep {
		$after->{$_} =~ /^-?[\d.]+$/ && $after->{$_} != ($before->{$_} // 0)
			&& !/$unknown/
	} keys %$after;
	return join ' ', map { "$_=" . ($after->{$_} - ($before->{$_} // 0)) } sort @changed;
}

# How many lookups the latency buckets of a zone gained.
sub buckets_moved {
	my ($before, $after, $zone) = @_;
	my $moved = 0;
	$moved += $after->{$_} - ($before->{$_} // 0)
		for grep { /^\Q$zone\E\.lookup_latency\.buckets\./ } keys %$after;
	return $moved;
}

# Runs a step; returns the JSON and Prometheus deltas it caused, and the buckets
# moved in zone "guard".
sub step {
	my ($code) = @_;
	my ($j0, $p0) = (json_counters(), prometheus_counters());
	$code->();
	my ($j1, $p1) = (json_counters(), prometheus_counters());
	return (deltas($j0, $j1), deltas($p0, $p1), buckets_moved($j0, $j1, 'guard'));
}

like(http_get('/status'), qr!^HTTP/1.1 200.*Content-Type: application/json!s,
	'status: JSON by default');
like(http_get('/status?format=prometheus'), qr!Content-Type: text/plain; version=0.0.4!,
	'status: Prometheus text on ?format=prometheus');
like(http("GET /status HTTP/1.0\r\nHost: localhost\r\nAccept: text/plain\r\n\r\n"),
	qr!Content-Type: text/plain!, 'status: Prometheus text on Accept: text/plain');
like(http("POST /status HTTP/1.0\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n"),
	qr!^HTTP/1.1 405.*^Allow: GET, HEAD\x0d$!ms, 'status: other methods are not allowed');
like(http_get('/status?format=xml'), qr!^HTTP/1.1 400!, 'status: an unknown format is an error');

for my $case (
	[ 'text/plain', 'text/plain', 'a scraper that asks for text' ],
	[ 'application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1',
		'text/plain', 'Prometheus\'s own Accept header' ],
	[ 'application/json, text/plain, */*', 'application/json', 'JSON first, on a tie' ],
	[ 'text/plain;q=0, application/json', 'application/json', 'text refused' ],
	[ '*/*', 'application/json', 'no preference' ],
) {
	my ($accept, $type, $why) = @$case;
	like(http("GET /status HTTP/1.0\r\nHost: localhost\r\nAccept: $accept\r\n\r\n"),
		qr!Content-Type: \Q$type\E!, "status: Accept $why");
}

my ($guard, $tight, $short) = (port(8443), port(8444), port(8445));
my ($json, $prom, $moved);

# zone "guard": one of each kind of handshake

($json, $prom, $moved) = step(sub { tls_get($guard, 'shop.example.com') });
is($json, 'guard.cache.entries=1 guard.cache.misses=1 guard.handshakes.allowed.lookup=1 '
	. 'guard.lookup_latency.count=1 guard.lookups.registered=1',
	'registered name, looked up: JSON');
is($prom, 'sni_guard_cache_entries{zone="guard"}=1 '
	. 'sni_guard_cache_misses_total{zone="guard"}=1 '
	. 'sni_guard_handshakes_allowed_total{zone="guard",how="lookup"}=1 '
	. 'sni_guard_lookup_duration_seconds_bucket{zone="guard",le="+Inf"}=1 '
	. 'sni_guard_lookup_duration_seconds_count{zone="guard"}=1 '
	. 'sni_guard_lookups_total{zone="guard",kind="handshake",outcome="registered"}=1',
	'registered name, looked up: Prometheus');
is($moved, 1, 'registered name, looked up: one latency bucket moved');

($json) = step(sub { tls_get($guard, 'shop.example.com') for 1 .. 3 });
is($json, 'guard.cache.hits=3 guard.handshakes.allowed.cache=3',
	'registered name, cached, three handshakes over both workers');

($json) = step(sub { tls_get($guard, 'evil.example.com') for 1 .. 2 });
is($json, 'guard.cache.entries=1 guard.cache.hits=1 guard.cache.misses=1 '
	. 'guard.handshakes.refused.not_registered=2 guard.lookup_latency.count=1 '
	. 'guard.lookups.not_registered=1',
	'unregistered name, looked up then cached');

($json) = step(sub { client_hello($guard, sni => 'bad_name.example') });
is($json, 'guard.handshakes.refused.invalid_name=1', 'invalid name');

($json) = step(sub { tls_get($guard, 'admin.example.com') });
is($json, 'guard.handshakes.allowed.allow_list=1', 'allow-listed name');

($json) = step(sub { tls_get($guard, undef) });
is($json, 'guard.handshakes.allowed.no_sni=1', 'no server name');

lookup_conf($d, mode => 'status 500');
($json) = step(sub { tls_get($guard, 'broken.example.com') });
is($json, 'guard.breaker.errors=1 guard.cache.misses=1 '
	. 'guard.handshakes.refused.lookup_error=1 guard.lookup_latency.count=1 '
	. 'guard.lookups.error=1',
	'lookup error');
lookup_conf($d, registered => [ 'shop.example.com', 'stale.example.com' ]);

# zone "tight": a budget of one lookup a minute

($json) = step(sub { tls_get($tight, $_) for 'one.example.com', 'two.example.com' });
is($json, 'tight.cache.entries=1 tight.cache.misses=2 '
	. 'tight.handshakes.refused.not_registered=1 tight.handshakes.refused.over_budget=1 '
	. 'tight.lookup_latency.count=1 tight.lookups.not_registered=1',
	'a miss over the budget');

# zone "short": an expired answer is used while it is refreshed

tls_get($short, 'stale.example.com');
select undef, undef, undef, 1.2;

($json) = step(sub {
	tls_get($short, 'stale.example.com');
	for (1 .. 30) {
		last if lookup_count($d, 'stale.example.com') >= 2;
		select undef, undef, undef, 0.1;
	}
	select undef, undef, undef, 0.3;
});
is($json, 'short.cache.hits=1 short.cache.stale=1 short.handshakes.allowed.stale=1 '
	. 'short.lookup_latency.count=1 short.refreshes.registered=1',
	'stale answer, refreshed in the background');

my $all = json_counters();
cmp_ok($all->{'guard.zone.bytes_used'}, '>', 0, 'bytes used reported');
is($all->{'guard.zone.bytes_total'}, 1048576, 'zone size reported');
is($all->{'guard.breaker.state'}, 'closed', 'breaker state reported');

###############################################################################
