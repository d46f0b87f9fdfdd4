from conftest import make_work_orders, wait_until
from mes_tasks.models import QuantityLog, WorkOrder
from mes_tasks.producer import submit_quantity_update


def test_one_update_through_a_real_worker(start_worker):
    make_work_orders(["WO-1"])
    w = start_worker()
    r = submit_quantity_update("WO-1", "output", 3, request_id="r1", context={"barcode": "B1"})
    print(r)
    assert r["success"], r
    wait_until(lambda: QuantityLog.objects.count() == 1, 20, "log")
    print(w.log()[-2000:])
    assert WorkOrder.objects.get(id="WO-1").output_qty == 3
