-- A film-rental application's schema, modelled on the pagila sample database: what a real
-- application brings to replication. Foreign keys with ON UPDATE CASCADE between almost all
-- tables, BEFORE UPDATE triggers keeping last_update, a tsvector kept by a trigger, an enum, a
-- domain, arrays, jsonb, a unique constraint besides the primary key, a table partitioned by
-- range with rows moving between partitions.
create type mpaa_rating as enum ('G', 'PG', 'PG-13', 'R', 'NC-17');
create domain year as integer check (value >= 1901 and value <= 2155);

create function last_updated() returns trigger language plpgsql as $$
begin
    new.last_update := clock_timestamp();
    return new;
end $$;

create table language (
    language_id serial primary key,
    name character(20) not null,
    last_update timestamptz not null default now()
);
create table category (
    category_id serial primary key,
    name text not null,
    last_update timestamptz not null default now()
);
create table actor (
    actor_id serial primary key,
    first_name text not null,
    last_name text not null,
    last_update timestamptz not null default now()
);
create table film (
    film_id serial primary key,
    title text not null,
    description text,
    release_year year,
    language_id integer not null references language on update cascade on delete restrict,
    rating mpaa_rating default 'G',
    special_features text[],
    fulltext tsvector,
    last_update timestamptz not null default now()
);
create table film_actor (
    actor_id integer not null references actor on update cascade on delete cascade,
    film_id integer not null references film on update cascade on delete cascade,
    last_update timestamptz not null default now(),
    primary key (actor_id, film_id)
);
create table film_category (
    film_id integer not null references film on update cascade on delete cascade,
    category_id integer not null references category on update cascade on delete restrict,
    last_update timestamptz not null default now(),
    primary key (film_id, category_id)
);
create table customer (
    customer_id serial primary key,
    first_name text not null,
    last_name text not null,
    email text,
    active boolean not null default true,
    preferences jsonb,
    last_update timestamptz not null default now()
);
create table inventory (
    inventory_id serial primary key,
    film_id integer not null references film on update cascade on delete restrict,
    last_update timestamptz not null default now()
);
create table rental (
    rental_id serial primary key,
    rental_date timestamptz not null,
    inventory_id integer not null references inventory on update cascade on delete restrict,
    customer_id integer not null references customer on update cascade on delete restrict,
    return_date timestamptz,
    last_update timestamptz not null default now(),
    unique (rental_date, inventory_id, customer_id)
);
create table payment (
    payment_id serial,
    customer_id integer not null references customer on update cascade on delete restrict,
    rental_id integer references rental on update cascade on delete set null,
    amount numeric(5, 2) not null,
    payment_date timestamptz not null,
    primary key (payment_date, payment_id)
) partition by range (payment_date);
-- not in pagila: reviews, big enough (12 000 rows, referenced by no other table) that replay's
-- copy builds its indexes after its rows; a unique key besides the primary key
create table film_review (
    review_id serial primary key,
    film_id integer not null references film on update cascade on delete cascade,
    customer_id integer not null references customer on update cascade on delete cascade,
    stars smallint not null check (stars between 1 and 5),
    body text,
    last_update timestamptz not null default now(),
    unique (film_id, customer_id)
);
create index film_review_customer on film_review (customer_id);

create table payment_2024 partition of payment for values from ('2024-01-01') to ('2025-01-01');
create table payment_2025 partition of payment for values from ('2025-01-01') to ('2026-01-01');
create table payment_2026 partition of payment for values from ('2026-01-01') to ('2027-01-01');

create trigger last_updated before update on language for each row execute function last_updated();
create trigger last_updated before update on category for each row execute function last_updated();
create trigger last_updated before update on actor for each row execute function last_updated();
create trigger last_updated before update on film for each row execute function last_updated();
create trigger last_updated before update on film_actor for each row execute function last_updated();
create trigger last_updated before update on film_category for each row execute function last_updated();
create trigger last_updated before update on customer for each row execute function last_updated();
create trigger last_updated before update on inventory for each row execute function last_updated();
create trigger last_updated before update on rental for each row execute function last_updated();
create trigger last_updated before update on film_review for each row execute function last_updated();
create trigger film_fulltext before insert or update on film for each row execute function
    tsvector_update_trigger(fulltext, 'pg_catalog.english', title, description);

insert into language (name) select 'language ' || i from generate_series(1, 6) i;
insert into category (name) select 'category ' || i from generate_series(1, 16) i;
insert into actor (first_name, last_name) select 'first' || i, 'last' || i from generate_series(1, 200) i;
insert into film (title, description, release_year, language_id, rating, special_features)
select 'film ' || i, 'a film about ' || md5(i::text), 1990 + i % 30, 1 + i % 6,
       (array['G', 'PG', 'PG-13', 'R', 'NC-17'])[1 + i % 5]::mpaa_rating,
       (array['Trailers', 'Deleted Scenes'])[1:1 + i % 2]
  from generate_series(1, 1000) i;
insert into film_actor (actor_id, film_id) select 1 + (i * 7) % 200, i from generate_series(1, 1000) i;
insert into film_actor (actor_id, film_id) select 1 + (i * 13) % 200, i from generate_series(1, 1000) i
    on conflict do nothing;
insert into film_category (film_id, category_id) select i, 1 + i % 16 from generate_series(1, 1000) i;
insert into customer (first_name, last_name, email, preferences)
select 'first' || i, 'last' || i, 'c' || i || '@example.com', jsonb_build_object('genre', i % 16, 'notify', i % 2 = 0)
  from generate_series(1, 600) i;
insert into inventory (film_id) select 1 + i % 900 from generate_series(1, 4500) i;
insert into rental (rental_date, inventory_id, customer_id, return_date)
select timestamptz '2024-01-01' + i * interval '1 hour', 1 + i % 4500, 1 + i % 600,
       timestamptz '2024-01-01' + i * interval '1 hour' + interval '3 days'
  from generate_series(1, 16000) i;
insert into payment (customer_id, rental_id, amount, payment_date)
select 1 + i % 600, i, (i % 1000) / 100.0, timestamptz '2024-01-01' + i * interval '1 hour'
  from generate_series(1, 16000) i;
insert into film_review (film_id, customer_id, stars, body)
select 1 + i % 1000, 1 + i / 1000, 1 + i % 5, 'review ' || md5(i::text)
  from generate_series(0, 11999) i;
